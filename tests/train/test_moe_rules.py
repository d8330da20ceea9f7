"""glm-train's GLM-4.5 training rules (train/moe_rules.py) against independent references:

- the MTP loss (`mtp_loss_weight`) and the sequence-wise balance loss (`moe.aux_loss_weight`): the loss parts and
  the gradients of the step's objective equal a PyTorch autograd computation built from transformers' Glm4Moe
  modules (the main model, MtpLayer for the MTP layer, sharing the main embedding and head; the balance formula
  on the routers' own outputs), with padding and prompt labels masked;
- aux-loss-free balancing (`moe.bias_update_rate`): the score biases after one step equal bias + rate ·
  sign(mean - load), the loads counted with numpy from transformers' router top-k choices;
- the expert-load metrics, in metrics.jsonl and TensorBoard;
- glm-train with an `expert` mesh axis, scan_layers and gradient accumulation gives the one-device losses, MTP
  losses, loads and score biases.
"""

import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers.moe_models import config as moe_config
from helpers.moe_models import randomise, torch_grads_by_key
from helpers.train_runs import GLM4_MOE, flat, glm4_moe_run, load_params, metrics, train

MTP_W, AUX_W, RATE = 0.3, 0.05, 1e-3
B, T = 3, 12


def _labels(ids):
    """GLM4_MOE-style labels: row 1 right-padded (4 pads), row 2 a 3-token prompt without loss and 2 pads."""
    labels = ids.copy()
    labels[1, -4:] = -100
    labels[2, :3] = -100
    labels[2, -2:] = -100
    ids = ids.copy()
    ids[1, -4:] = 0
    ids[2, -2:] = 0
    return ids, labels


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny Glm4MoeForCausalLM (1 dense + 1 MoE layer) and a transformers MtpLayer, saved as one
    checkpoint with the MTP layer at index num_hidden_layers (its embedding and head: copies of the main ones,
    as in the released checkpoints)."""
    from safetensors.numpy import load_file, save_file
    from transformers.modeling_layers import MtpLayer
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeDecoderLayer, Glm4MoeRMSNorm

    case = (7, 8, 2, 2, 1, 1, 1, True, True, 2, 0.5, 4, 2, 2.5)
    torch.manual_seed(7)
    model = transformers.Glm4MoeForCausalLM(moe_config(*case)).eval()
    randomise(model)
    model.model.embed_tokens.padding_idx = None  # glm-train trains the pad row too (the balance loss reaches it)
    L = model.config.num_hidden_layers
    layer = MtpLayer(model.config.get_mtp_config(), Glm4MoeDecoderLayer, Glm4MoeRMSNorm, 0).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.1)
    randomise(layer)
    path = tmp_path_factory.mktemp("moe_rules") / "ckpt"
    model.save_pretrained(path)
    sd = load_file(str(path / "model.safetensors"))
    for name, a in _layer_state(layer).items():
        sd[f"model.layers.{L}.{name}"] = a
    sd[f"model.layers.{L}.embed_tokens.weight"] = sd["model.embed_tokens.weight"].copy()
    sd[f"model.layers.{L}.shared_head.head.weight"] = sd["lm_head.weight"].copy()
    save_file(sd, str(path / "model.safetensors"))
    rng = np.random.default_rng(7)
    ids, labels = _labels(rng.integers(3, model.config.vocab_size, size=(B, T)))
    return model, layer, path, ids, labels


def _layer_state(layer, grads=False):
    """MtpLayer's tensors (or gradients) under the checkpoint's key names (experts split per expert)."""
    out = {}
    for name, p in layer.named_parameters():
        a = (p.grad if grads else p.detach()).numpy()
        if name.endswith("experts.gate_up_proj"):
            inner = a.shape[1] // 2
            stem = name.replace("mtp_block.", "")[: -len("gate_up_proj")]
            for e in range(a.shape[0]):
                out[f"{stem}{e}.gate_proj.weight"] = np.ascontiguousarray(a[e, :inner])
                out[f"{stem}{e}.up_proj.weight"] = np.ascontiguousarray(a[e, inner:])
        elif name.endswith("experts.down_proj"):
            stem = name.replace("mtp_block.", "")[: -len("down_proj")]
            for e in range(a.shape[0]):
                out[f"{stem}{e}.down_proj.weight"] = np.ascontiguousarray(a[e])
        else:
            out[name.replace("mtp_block.", "").replace("post_norm.", "shared_head.norm.")] = a
    if not grads:
        for name, b in layer.named_buffers():
            out[name.replace("mtp_block.", "")] = b.numpy()
    return out


def _ce(logits, labels):
    valid = labels != -100
    logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(np.where(valid, labels, 0))[..., None])[..., 0]
    w = torch.tensor(valid, dtype=torch.float32)
    return -(logp * w).sum() / w.sum()


def _balance(router_logits, idx, rows):
    """DeepSeek-V3's sequence-wise balance term from one router's outputs, in torch."""
    E, k = router_logits.shape[-1], idx.shape[-1]
    s = torch.sigmoid(router_logits).view(rows, -1, E)
    n = s.shape[1]
    p = (s / s.sum(-1, keepdim=True)).mean(1)
    counts = torch.nn.functional.one_hot(idx.view(rows, -1), E).sum(1).float()
    return ((counts * E / (k * n)) * p).sum(-1).mean()


@pytest.fixture(scope="module")
def reference(tiny):
    """transformers in torch: the main CE (labels[t+1] at t), the MTP CE (labels[t+2] at t, through MtpLayer fed
    the main final hidden states and the main embedding of token t+1, then the main lm_head), the balance term
    of every router that ran; each part's gradients by autograd; the routers' top-k choices."""
    model, layer, _, ids, labels = tiny
    gates = [m for m in list(model.modules()) + list(layer.modules()) if type(m).__name__ == "Glm4MoeTopkRouter"]
    seen = []
    hooks = [g.register_forward_hook(lambda m, i, o: seen.append(o)) for g in gates]
    pos = torch.arange(T)[None].expand(B, T)
    out = model(input_ids=torch.tensor(ids), position_ids=pos, output_hidden_states=True)
    nxt = torch.tensor(np.concatenate([ids[:, 1:], np.zeros((B, 1), ids.dtype)], 1))
    emb = model.model.embed_tokens(nxt)
    causal = torch.full((T, T), float("-inf")).triu(1)[None, None].expand(B, 1, T, T)
    hh = layer(
        emb,
        out.hidden_states[-1],
        position_embeddings=model.model.rotary_emb(emb, pos),
        attention_mask=causal,
        position_ids=pos,
        cache=None,
    )
    for h in hooks:
        h.remove()
    main = _ce(out.logits[:, :-1], labels[:, 1:])
    mtp = _ce(model.lm_head(hh)[:, :-2], labels[:, 2:])
    assert len(seen) == 2  # the MoE layer of the main model, the MTP layer's
    bal = sum(_balance(o[0], o[2], B) for o in seen)
    parts, L = {}, model.config.num_hidden_layers
    params = list(model.parameters()) + list(layer.parameters())
    for name, term in [("main", main), ("mtp", mtp), ("bal", bal)]:
        for p in params:  # zeros, not None, where a term does not reach a param
            p.grad = torch.zeros_like(p)
        term.backward(retain_graph=True)
        g = {k: v.copy() for k, v in torch_grads_by_key(model).items()}
        g.update({f"model.layers.{L}.{k}": v.copy() for k, v in _layer_state(layer, True).items()})
        parts[name] = g
    loads = [np.bincount(o[2].numpy().reshape(-1), minlength=8) for o in seen]
    return {"main": main.item(), "mtp": mtp.item(), "bal": bal.item(), "grads": parts, "loads": loads}


def _batch(ids, labels):
    """glm-train's causal batch for the GLM4_MOE labels: targets[t] = ids[t+1], loss where labels[t+1] counts."""
    tgt = np.concatenate([ids[:, 1:], np.zeros((B, 1), ids.dtype)], 1)
    mask = np.concatenate([labels[:, 1:] != -100, np.zeros((B, 1), bool)], 1)
    return {
        "tokens": jnp.asarray(ids, jnp.int32),
        "targets": jnp.asarray(tgt, jnp.int32),
        "loss_mask": jnp.asarray(mask, jnp.float32),
        "position_ids": jnp.asarray(np.broadcast_to(np.arange(T), (B, T)), jnp.int32),
    }


def _tc(*keys):
    from train.config import build

    return build(None, ["objective=causal", f"batch_size={B}", f"seq_len={T}", "learning_rate=1e-2", *keys])


def _by_hf_key(cfg, tree):
    from glm_jax import families

    out = {}
    for r in families.keymap(cfg):
        arrays = [np.asarray(jax.device_get(_at(tree, p))) for p in r.jax]
        out.update(zip(r.hf, r.save(cfg, arrays)))
    return out


def _at(tree, path):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def test_mtp_and_balance_losses_and_gradients_match_torch_autograd(tiny, reference):
    import glm_jax
    from train import moe_rules, optimizer
    from train import step as step_lib

    model, _, path, ids, labels = tiny
    lm = glm_jax.from_pretrained(path)
    cfg = lm.config
    assert cfg.num_mtp_layers == 1
    tc = _tc(f"mtp_loss_weight={MTP_W}", f"moe.aux_loss_weight={AUX_W}")
    rules = moe_rules.Rules.of(cfg, tc)
    frozen = optimizer.frozen_mask(lm.params, optimizer.not_trained(cfg, tc))
    grads, sums = jax.jit(step_lib.make_grad_fn(lm.module, tc, frozen, rules=rules))(lm.params, _batch(ids, labels))
    ref = reference
    assert abs(float(sums["ce"] / sums["count"]) - ref["main"]) <= 1e-5 * ref["main"]
    assert abs(float(sums["mtp_ce"][0] / sums["mtp_count"][0]) - ref["mtp"]) <= 1e-5 * ref["mtp"]
    assert int(sums["mtp_count"][0]) == int((labels[:, 2:] != -100).sum())
    assert abs(float(sums["balance"]) - ref["bal"]) <= 1e-5 * ref["bal"]

    L = cfg.num_layers
    parts = ref["grads"]
    want = {k: g + MTP_W * parts["mtp"][k] + AUX_W * parts["bal"][k] for k, g in parts["main"].items()}
    got = _by_hf_key(cfg, grads)
    copies = {f"model.layers.{L}.embed_tokens.weight", f"model.layers.{L}.shared_head.head.weight"}
    for k, g in got.items():
        if k.endswith("e_score_correction_bias") or k in copies:  # a buffer; copies of the shared main weights
            assert not np.any(g), k
            continue
        w = want[k]
        tol = 1e-4 * max(np.abs(w).max(), 1e-6)
        assert np.abs(g - w).max() <= tol, (k, np.abs(g - w).max(), np.abs(w).max())
        if k in ("model.embed_tokens.weight", "lm_head.weight"):  # the MTP loss reaches the shared weights
            assert np.abs(MTP_W * parts["mtp"][k]).max() > 100 * tol, k
        if k == "model.layers.1.mlp.gate.weight":  # the balance loss reaches the router
            assert np.abs(AUX_W * parts["bal"][k]).max() > 100 * tol, k
    assert set(want) <= set(got)


def test_bias_update_and_load_metrics_follow_transformers_routing(tiny, reference):
    """One train step (scan_layers: a dense and a MoE stack): score bias + RATE · sign(mean - load) per router,
    loads from transformers' top-k choices; the metrics report the reference losses and max/mean loads; the MTP
    layer's embedding and head copies are the updated main ones."""
    import glm_jax
    from glm_jax.checkpoint import layout
    from train import optimizer
    from train import step as step_lib

    _, _, path, ids, labels = tiny
    lm = glm_jax.from_pretrained(path, scan_layers=True)
    cfg = lm.config
    tc = _tc(f"mtp_loss_weight={MTP_W}", f"moe.aux_loss_weight={AUX_W}", f"moe.bias_update_rate={RATE}")
    frozen = optimizer.frozen_mask(lm.params, optimizer.not_trained(cfg, tc))
    tx = optimizer.make_optimizer(tc, lm.params, frozen)
    step = jax.jit(step_lib.make_train_step(lm.module, tx, tc, optimizer.make_schedule(tc, 0), frozen))
    state, m = step(step_lib.init_state(lm.params, tx), _batch(ids, labels))
    before = _by_hf_key(cfg, layout.unstack(lm.params))
    after = _by_hf_key(cfg, layout.unstack(jax.device_get(state["params"])))

    L = cfg.num_layers
    for layer, load in zip([1, L], reference["loads"]):
        key = f"model.layers.{layer}.mlp.gate.e_score_correction_bias"
        b0 = before[key].astype(np.float32)
        expected = b0 + np.float32(RATE) * np.sign(load.mean() - load).astype(np.float32)
        assert load.sum() == B * T * cfg.num_experts_per_tok and np.any(load != load.mean())
        np.testing.assert_allclose(after[key], expected, rtol=0, atol=1e-7, err_msg=key)
        label = "mtp_0" if layer == L else f"layer_{layer}"
        assert abs(float(m[f"moe/load_max_over_mean/{label}"]) - load.max() / load.mean()) <= 1e-6
    assert abs(float(m["loss"]) - reference["main"]) <= 1e-5 * reference["main"]
    assert abs(float(m["mtp_loss"]) - reference["mtp"]) <= 1e-5 * reference["mtp"]
    assert abs(float(m["moe/aux_loss"]) - AUX_W * reference["bal"]) <= 1e-5 * AUX_W * reference["bal"]
    ratios = [ld.max() / ld.mean() for ld in reference["loads"]]
    assert abs(float(m["moe/load_max_over_mean"]) - np.mean(ratios)) <= 1e-6
    assert not np.array_equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert np.array_equal(after[f"model.layers.{L}.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert np.array_equal(after[f"model.layers.{L}.shared_head.head.weight"], after["lm_head.weight"])
    assert not np.array_equal(after[f"model.layers.{L}.eh_proj.weight"], before[f"model.layers.{L}.eh_proj.weight"])


def test_mtp_targets_stay_inside_one_document():
    """Packed rows: MTP layer j at t predicts token t+j+2 only where t..t+j+1 are one segment and the main loss
    counts token t+j+2 (hand-written expectation)."""
    from train.moe_rules import mtp_targets

    tgt = np.arange(1, 9)[None]  # targets[t] = token t+1
    seg = np.array([[1, 1, 1, 2, 2, 2, 2, 0]])
    mask = np.array([[1, 1, 0, 1, 1, 1, 0, 0]], np.float32)  # cross-document and padding targets off
    batch = {"targets": jnp.asarray(tgt), "loss_mask": jnp.asarray(mask), "segment_ids": jnp.asarray(seg)}
    t0, m0 = mtp_targets(batch, 0)
    np.testing.assert_array_equal(np.asarray(t0), [[2, 3, 4, 5, 6, 7, 8, 0]])
    np.testing.assert_array_equal(np.asarray(m0), [[1, 0, 0, 1, 1, 0, 0, 0]])
    t1, m1 = mtp_targets(batch, 1)
    np.testing.assert_array_equal(np.asarray(t1), [[3, 4, 5, 6, 7, 8, 0, 0]])
    np.testing.assert_array_equal(np.asarray(m1), [[0, 0, 0, 1, 0, 0, 0, 0]])
    del batch["segment_ids"]  # one stream: only the loss mask rules
    np.testing.assert_array_equal(np.asarray(mtp_targets(batch, 0)[1]), [[1, 0, 1, 1, 1, 0, 0, 0]])


def _tb_scalars(out_dir) -> dict:
    """{tag: {step: value}} from the run's TensorBoard event files (TFRecord framing, tensorboardX's protos)."""
    from tensorboardX.proto import event_pb2

    tags = {}
    for f in sorted((out_dir / "tensorboard").glob("events.out.tfevents.*")):
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            ev = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                tags.setdefault(v.tag, {})[ev.step] = v.simple_value
    return tags


RUN_KEYS = (f"mtp_loss_weight={MTP_W}", f"moe.bias_update_rate={RATE}", f"moe.aux_loss_weight={AUX_W}", "steps=3")
RUN_KEYS += ("checkpoint_every=100", "async_checkpointing=false", "loss_select=false", "peak_flops=1e12")  # fast


def test_glm_train_expert_axis_and_accumulation_equal_one_device(tmp_path):
    """The fixture checkpoint (MTP layer included): one device vs expert=4 with grad_accum=2 — the same losses,
    MTP losses, load metrics and score biases at every step (three steps: each one's bias update and MTP
    training shape the next)."""
    import glm_jax

    one, ep = tmp_path / "one", tmp_path / "ep"
    train(glm4_moe_run(one, *RUN_KEYS))
    keys = ("mesh.expert=4", "grad_accum=2")
    train(glm4_moe_run(ep, *RUN_KEYS, *keys))
    a, b = metrics(one), metrics(ep)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    names = ["loss", "mtp_loss", "moe/aux_loss", "moe/seq_balance", "moe/load_max_over_mean"]
    names += [f"moe/load_max_over_mean/{n}" for n in ("layer_1", "layer_2", "mtp_0")]
    for ra, rb in zip(a, b):
        for k in names:
            assert abs(ra[k] - rb[k]) <= 1e-4 * abs(ra[k]), (ra["step"], k, ra[k], rb[k])
    assert a[-1]["mtp_loss"] < a[0]["mtp_loss"]  # the MTP layer trains
    tb = _tb_scalars(one)
    assert sorted(tb["train/mtp_loss"]) == [1, 2, 3]
    assert tb["train/moe/load_max_over_mean/layer_1"][2] == pytest.approx(a[1]["moe/load_max_over_mean/layer_1"])

    ref = flat(jax.tree.map(np.asarray, glm_jax.from_pretrained(GLM4_MOE).params))
    pa, pb = flat(load_params(one, 3)), flat(load_params(ep, 3))
    biases = [k for k in ref if k.endswith("score_bias")]
    assert len(biases) == 3  # layers 1, 2 and the MTP block
    for k in biases:
        moved = (pa[k] - ref[k]) / RATE  # three steps of ±1 or 0 each
        assert np.allclose(moved, np.round(moved), atol=1e-3) and np.abs(moved).max() < 3.001 and np.any(moved), k
    for k in biases:
        np.testing.assert_allclose(pb[k], pa[k], rtol=0, atol=1e-7, err_msg=k)
    np.testing.assert_array_equal(pa["mtp_0/embed/embedding"], pa["embed/embedding"])


def test_keys_are_checked_against_the_model_and_objective(tmp_path):
    from train.config import TrainConfigError, build
    from train.moe_rules import check_model
    from train.trainer import model_config

    with pytest.raises(TrainConfigError, match="mtp_loss_weight must be"):
        build(None, ["mtp_loss_weight=-1"])
    with pytest.raises(TrainConfigError, match="objective=cloze"):
        build(None, ["objective=cloze", "data.source=x.jsonl", "moe.aux_loss_weight=0.1"])
    with pytest.raises(TrainConfigError, match="adapter"):
        build(None, ["moe.bias_update_rate=0.001", "lora.rank=4", "lora.targets=[q_proj]"])
    tc = build(None, ["model=glm4_9b", "mtp_loss_weight=0.3"])
    with pytest.raises(TrainConfigError, match="no multi-token-prediction layer"):
        check_model(tc, model_config(tc)[0])
    tc = build(None, ["model=glm4_9b", "moe.bias_update_rate=0.001"])
    with pytest.raises(TrainConfigError, match="not a mixture-of-experts"):
        check_model(tc, model_config(tc)[0])
