"""Live parity with transformers' Glm4MoeForCausalLM on random tiny configs other than the fixture's: logits with left
padding, KV-cache greedy decoding, the loss and gradients of a train step under torch autograd, and the MTP layer
against transformers' MtpLayer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers.moe_models import config as moe_config
from helpers.moe_models import randomise, torch_grads_by_key

# (seed, experts, top-k, n_group, topk_group, shared, first_k_dense, qk_norm, norm_topk_prob, layers, rope factor,
#  heads, kv heads, routed_scaling_factor)
CASES = [
    (0, 8, 2, 1, 1, 1, 1, True, True, 3, 0.5, 4, 2, 2.5),
    (1, 6, 3, 3, 2, 2, 0, False, False, 2, 1.0, 4, 4, 1.0),
    (2, 16, 4, 4, 2, 1, 2, True, False, 3, 0.25, 8, 2, 1.5),
]


def _build(case, tmp_path):
    torch.manual_seed(case[0])
    model = transformers.Glm4MoeForCausalLM(moe_config(*case)).eval()
    randomise(model)
    path = tmp_path / f"glm4moe-{case[0]}"
    model.save_pretrained(path)
    return model, path


def _batch(seed, vocab, B=3, T=10):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, :3] = 0  # left padding
    mask[2, :6] = 0
    ids[mask == 0] = 0
    return ids, mask, np.clip(mask.cumsum(1) - 1, 0, None)


@pytest.mark.parametrize("case", CASES, ids=[f"seed{c[0]}-E{c[1]}k{c[2]}g{c[3]}/{c[4]}" for c in CASES])
def test_logits_and_cached_greedy_decoding_match_transformers(case, tmp_path):
    import glm_jax

    model, path = _build(case, tmp_path)
    ids, mask, pos = _batch(case[0], 200)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
    lm = glm_jax.from_pretrained(path)
    c = lm.config
    assert c.family == "glm4-moe" and c.num_mtp_layers == 0  # save_pretrained writes no MTP layer
    assert (c.num_experts, c.num_experts_per_tok, c.n_group, c.topk_group) == case[1:5]
    assert (c.n_shared_experts, c.first_k_dense_replace, c.qk_norm, c.norm_topk_prob) == case[5:9]
    real = mask.astype(bool)
    ours = np.asarray(lm(ids, attention_mask=mask))  # default positions count the real tokens
    assert np.abs(ours - ref.logits.numpy())[real].max() <= 1e-4

    new = 6
    with torch.no_grad():
        hf = model.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=new,
            do_sample=False,
            num_beams=1,
            eos_token_id=[-5],
            pad_token_id=0,
        ).numpy()
    out, steps = lm.generate(ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[-5], return_logits=True)
    np.testing.assert_array_equal(out, hf)
    full_mask = np.concatenate([mask, np.ones((len(ids), new), np.int64)], 1)
    full = np.asarray(lm(out, attention_mask=full_mask))
    assert np.abs(full[:, ids.shape[1] - 1 : -1] - steps).max() <= 1e-4


def test_train_step_loss_and_gradients_match_torch_autograd(tmp_path):
    """Under scan_layers (a dense stack and a MoE stack) with full remat: the train step's configuration."""
    import glm_jax
    from glm_jax import families
    from glm_jax.checkpoint import layout

    case = (3, 8, 2, 2, 1, 1, 1, True, True, 2, 0.5, 4, 2, 2.5)
    model, path = _build(case, tmp_path)
    ids, mask, pos = _batch(3, 200, T=12)
    tgt_mask = (mask[:, 1:] * mask[:, :-1]).astype(np.float32)

    model.zero_grad()
    logits = model(
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)
    ).logits
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, torch.tensor(ids[:, 1:])[..., None])[..., 0]
    w = torch.tensor(tgt_mask)
    ref_loss = -(logp * w).sum() / w.sum()
    ref_loss.backward()
    ref_loss = ref_loss.detach()
    ref = torch_grads_by_key(model)

    lm = glm_jax.from_pretrained(path, scan_layers=True, remat="full")

    def loss_fn(p):
        lo = lm.module.apply({"params": p}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos))
        lp = jnp.take_along_axis(jax.nn.log_softmax(lo[:, :-1]), jnp.asarray(ids[:, 1:])[..., None], -1)[..., 0]
        return -(lp * tgt_mask).sum() / tgt_mask.sum()

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(lm.params)
    assert abs(float(loss) - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    grads = layout.unstack(jax.device_get(grads))
    cfg = lm.config
    seen = set()
    for r in families.keymap(cfg):
        arrays = []
        for p in r.jax:
            node = grads
            for part in p.split("/"):
                node = node[part]
            arrays.append(np.asarray(node))
        for key, g in zip(r.hf, r.save(cfg, arrays)):
            seen.add(key)
            if key.endswith("e_score_correction_bias"):
                assert not np.any(g), key  # a buffer: no gradient
                continue
            want = ref[key]
            assert g.shape == want.shape, key
            assert np.abs(g - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), key
    assert seen - {k for k in seen if k.endswith("e_score_correction_bias")} == set(ref)
    assert any(np.abs(g).max() > 0 for k, g in ref.items() if ".experts." in k)


def test_mtp_layer_matches_transformers_mtp_layer(tmp_path):
    """A checkpoint with an MTP layer at index num_hidden_layers (built from transformers' MtpLayer) loads, and our
    MTP logits equal MtpLayer's: eh_proj([enorm(embed(next ids)) | hnorm(final hidden)]) -> MoE block ->
    shared_head.norm -> head."""
    from safetensors.numpy import load_file, save_file
    from transformers.modeling_layers import MtpLayer
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeDecoderLayer, Glm4MoeRMSNorm

    import glm_jax

    case = (4, 8, 2, 2, 1, 1, 1, True, True, 2, 0.5, 4, 2, 2.5)
    model, path = _build(case, tmp_path)
    L = model.config.num_hidden_layers
    torch.manual_seed(5)
    layer = MtpLayer(model.config.get_mtp_config(), Glm4MoeDecoderLayer, Glm4MoeRMSNorm, 0).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.1)
    randomise(layer)

    sd = load_file(str(path / "model.safetensors"))
    pre = f"model.layers.{L}."
    for name, t in layer.state_dict().items():
        a = t.numpy()
        if name.endswith("experts.gate_up_proj"):
            inner = a.shape[1] // 2
            for e in range(a.shape[0]):
                sd[f"{pre}mlp.experts.{e}.gate_proj.weight"] = np.ascontiguousarray(a[e, :inner])
                sd[f"{pre}mlp.experts.{e}.up_proj.weight"] = np.ascontiguousarray(a[e, inner:])
        elif name.endswith("experts.down_proj"):
            for e in range(a.shape[0]):
                sd[f"{pre}mlp.experts.{e}.down_proj.weight"] = np.ascontiguousarray(a[e])
        else:
            name = name.replace("mtp_block.", "").replace("post_norm.", "shared_head.norm.")
            sd[pre + name] = a
    sd[pre + "embed_tokens.weight"] = sd["model.embed_tokens.weight"].copy()  # the released checkpoints' copies
    sd[pre + "shared_head.head.weight"] = sd["lm_head.weight"].copy()
    save_file(sd, str(path / "model.safetensors"))

    B, T = 2, 9
    ids = np.random.default_rng(4).integers(3, 200, size=(B, T))
    pos = np.broadcast_to(np.arange(T), (B, T))
    nxt = np.concatenate([ids[:, 1:], np.zeros((B, 1), ids.dtype)], 1)
    with torch.no_grad():
        h = model(input_ids=torch.tensor(ids), output_hidden_states=True).hidden_states[-1]
        emb = model.model.embed_tokens(torch.tensor(nxt))
        rot = model.model.rotary_emb(emb, torch.tensor(pos))
        causal = torch.full((T, T), float("-inf")).triu(1)[None, None].expand(B, 1, T, T)
        hh = layer(emb, h, position_embeddings=rot, attention_mask=causal, position_ids=torch.tensor(pos), cache=None)
        ref = model.lm_head(hh).numpy()

    lm = glm_jax.from_pretrained(path)
    assert lm.config.num_mtp_layers == 1 and "mtp_0" in lm.params
    _, hid = lm.module.apply({"params": lm.params}, ids, method="with_hidden")
    mtp = np.asarray(lm.module.apply({"params": lm.params}, hid.final, ids, method="mtp"))
    assert mtp.shape == (1, B, T, 200 + 4)
    assert np.abs(mtp[0] - ref).max() <= 1e-4
