"""glm-train `quantize` (train/quant_base.py): LoRA and P-Tuning v2 on an int8 / int4 base that stays quantized and
frozen. LoRA's loss and gradients on an int8 base equal peft's LoRA on a transformers Glm4ForCausalLM holding the
dequantized weights (quantized here with the rule written out in torch); P-Tuning on an int4 base leaves every base
leaf bit-identical (int8 bytes and scales) while the loss falls; a ChatGLM quantization_bit checkpoint trains as
stored; compile_only prices the int4 base below the bf16 one by exactly the bytes the weights save."""

import json

import jax
import numpy as np
import pytest
from helpers import SFT_EXAMPLES as EXAMPLES
from helpers.adapter_models import build_chatglm2_base, build_glm4_chat
from helpers.train_runs import CACHE, load_params, metrics

import glm_jax
from glm_jax.checkpoint.orbax import open_jax

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")  # Glm4's layer linears
TARGETS = ["q_proj", "v_proj", "gate_up_proj", "down_proj"]


def _build(*keys):
    from train.config import build

    return build(None, ["progress=none", f"compilation_cache_dir={CACHE}", *keys])


@pytest.fixture(scope="module")
def glm4_base(tmp_path_factory):
    import safetensors.torch

    folder = tmp_path_factory.mktemp("qlora") / "base"
    build_glm4_chat(folder)
    # an outlier input feature in every layer linear (as real LLM weights have): coarse int8 steps, so that the
    # dequantized base is told apart from the float one well beyond the comparison's tolerance
    path = folder / "model.safetensors"
    state = safetensors.torch.load_file(str(path))
    for k, w in state.items():
        if k.endswith(tuple(f"{n}.weight" for n in LINEARS)):
            w[:, 0] *= 20.0
    safetensors.torch.save_file(state, str(path), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def chatglm2_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qptuning") / "base"
    build_chatglm2_base(folder)
    return folder


# ---------------------------------------------------------------- (a) LoRA on an int8 base vs peft
def _dequantized_int8(w):
    """The weight-only int8 rule written out in torch: per output row, scale = max|w| / 127, q = round half to
    even of w / scale (float32), w' = q * scale."""
    import torch

    s = w.abs().amax(dim=1, keepdim=True) / 127.0
    return torch.round(w / s) * s


def _torch_loss(model, b):
    """Mean CE over glm-train's loss positions of a packed batch (block-diagonal causal mask from segment_ids)."""
    import torch

    seg = b["segment_ids"]
    T = seg.shape[1]
    mask = (seg[:, :, None] == seg[:, None, :]) & np.tril(np.ones((T, T), bool))
    logits = model(
        input_ids=torch.tensor(b["tokens"], dtype=torch.long),
        position_ids=torch.tensor(b["position_ids"], dtype=torch.long),
        attention_mask=torch.tensor(mask[:, None]),
    ).logits
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), torch.tensor(b["targets"], dtype=torch.long).reshape(-1), reduction="none"
    )
    m = torch.tensor(b["loss_mask"], dtype=torch.float32).reshape(-1)
    return (ce * m).sum() / m.sum()


def test_lora_on_int8_base_equals_peft_on_the_dequantized_weights(glm4_base, tmp_path):
    import peft
    import safetensors.torch
    import torch
    import transformers

    from train import data as data_lib
    from train.loss import loss_sums
    from train.trainer import Run

    tc = _build(
        f"model={glm4_base}", "objective=sft", "data.format=glm4", f"data.source={EXAMPLES / 'glm4_chat.jsonl'}",
        "seq_len=64", "batch_size=2", "steps=1", "quantize=int8", "lora.rank=4", "lora.alpha=8",
        f"lora.targets=[{', '.join(TARGETS)}]", "scan_layers=true", f"output_dir={tmp_path / 'run'}",
    )  # fmt: skip
    run = Run(tc)
    params = run.state["params"]
    q = params["layers"]["block"]["attn"]["q"]
    assert q["kernel"].dtype == np.int8 and "kernel_scale" in q  # the base in memory is int8
    # a non-zero adapter (PEFT's init has B = 0, where A's gradient vanishes)
    rng = np.random.default_rng(1)
    lora = jax.tree.map(lambda a: rng.normal(0, 0.3, a.shape).astype(np.float32), jax.device_get(params["lora"]))
    params = {**params, "lora": jax.device_put(lora, run.state_sh["params"]["lora"])}
    run.state = {**run.state, "params": params}
    local = data_lib.to_device_dict(next(run.data))
    with run.ctx():
        batch = run.device_batch(local)

        def mean_ce(lo):
            _, sums = loss_sums(run.module, run.adapter.loss_params({**params, "lora": lo}), batch)
            return sums["ce"] / sums["count"]

        ours = jax.device_get(jax.jit(jax.grad(mean_ce))(params["lora"]))
        _, m = run.step_fn(run.state, batch)  # the train step itself: its loss and gradient norm
    m = jax.device_get(m)

    # transformers + peft on the dequantized base, with the same A and B
    state = safetensors.torch.load_file(str(glm4_base / "model.safetensors"))
    quantized = {k: _dequantized_int8(v) for k, v in state.items() if k.endswith(tuple(f"{n}.weight" for n in LINEARS))}
    assert len(quantized) == 2 * len(LINEARS)
    model = transformers.Glm4ForCausalLM.from_pretrained(glm4_base, torch_dtype=torch.float32)
    model.load_state_dict({**state, **quantized}, strict=False)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    sites = {s.module: f"{i:03d}" for i, s in enumerate(run.adapter.sites)}
    mods = {}
    with torch.no_grad():
        for name, p in pm.named_parameters():
            for w in ("A", "B"):
                tail = f".lora_{w}.default.weight"
                if name.endswith(tail):
                    mod = name[len("base_model.model.") : -len(tail)]
                    p.copy_(torch.from_numpy(lora[sites[mod]][w]))
                    mods[(mod, w)] = p
    assert len(mods) == 2 * len(sites) == 2 * 2 * len(TARGETS)
    loss = _torch_loss(pm, local)
    loss.backward()

    assert abs(float(m["loss"]) - float(loss)) <= 1e-4 * float(loss), (float(m["loss"]), float(loss))
    theirs_norm = np.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in mods.values()))
    assert abs(float(m["grad_norm"]) - theirs_norm) <= 1e-4 * theirs_norm, (float(m["grad_norm"]), theirs_norm)
    for (mod, w), p in mods.items():
        g, want = ours[sites[mod]][w], p.grad.numpy()
        assert np.abs(g - want).max() <= 1e-4 * np.abs(want).max(), (mod, w)
    # the comparison tells the int8 base from the float one: peft on the float weights is off by far more
    model_f = transformers.Glm4ForCausalLM.from_pretrained(glm4_base, torch_dtype=torch.float32)
    pf = peft.get_peft_model(model_f, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    named = dict(pf.named_parameters())
    with torch.no_grad():
        for mod, w in mods:
            named[f"base_model.model.{mod}.lora_{w}.default.weight"].copy_(torch.from_numpy(lora[sites[mod]][w]))
    unquantized = _torch_loss(pf, local)
    unquantized.backward()
    assert abs(float(unquantized) - float(loss)) > 3e-4 * float(loss), (float(unquantized), float(loss))
    off = max(
        np.abs(named[f"base_model.model.{mod}.lora_{w}.default.weight"].grad.numpy() - p.grad.numpy()).max()
        / np.abs(p.grad.numpy()).max()
        for (mod, w), p in mods.items()
    )
    assert off > 1e-2, off  # 100x the tolerance


def test_lora_run_on_int8_base_loads_as_the_model_peft_gives(glm4_base, tmp_path):
    """A trained LoRA run on an int8 base, read back by from_pretrained: the logits and greedy ids of peft loading
    the run's own adapter files onto transformers' Glm4 holding the dequantized weights (1e-4; ids exact)."""
    import peft
    import safetensors.torch
    import torch
    import transformers

    from train.trainer import train

    run = tmp_path / "run"
    train(
        _build(
            f"model={glm4_base}", "objective=sft", "data.format=glm4", f"data.source={EXAMPLES / 'glm4_chat.jsonl'}",
            "seq_len=64", "batch_size=2", "steps=3", "learning_rate=5e-2", "warmup_steps=1", "quantize=int8",
            "lora.rank=4", "lora.alpha=8", f"lora.targets=[{', '.join(TARGETS)}]", "scan_layers=true",
            f"output_dir={run}",
        )
    )  # fmt: skip
    lm = glm_jax.from_pretrained(run)
    assert lm.config.quantization_bit == 0
    state = safetensors.torch.load_file(str(glm4_base / "model.safetensors"))
    deq = {k: _dequantized_int8(v) for k, v in state.items() if k.endswith(tuple(f"{n}.weight" for n in LINEARS))}
    model = transformers.Glm4ForCausalLM.from_pretrained(glm4_base, torch_dtype=torch.float32)
    model.load_state_dict({**state, **deq}, strict=False)
    pm = peft.PeftModel.from_pretrained(model, str(run)).eval()  # the run folder's adapter_config / safetensors
    assert max(float(p.abs().max()) for n, p in pm.named_parameters() if "lora_B" in n) > 0  # it trained

    ids = np.random.default_rng(0).integers(3, lm.config.vocab_size, size=(2, 12))
    with torch.no_grad():
        want = pm(input_ids=torch.tensor(ids)).logits.numpy()
        want_ids = pm.generate(
            input_ids=torch.tensor(ids), max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None
        ).numpy()
    got = np.asarray(lm(ids))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    np.testing.assert_array_equal(np.asarray(lm.generate(ids, max_new_tokens=8, eos_token_id=[-1])), want_ids)
    # the comparison tells the merged adapter apart: without it, or on the float base, the logits are far off
    with torch.no_grad(), pm.disable_adapter():
        plain = pm(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(plain - want).max() > 100 * 1e-4 * np.abs(want).max()


# ---------------------------------------------------------------- (b) P-Tuning on an int4 base
def _saved(run) -> dict:
    ck = open_jax(run)
    return {p: np.asarray(ck.store.read(p)) for p in ck.store.paths()}


def _flat(tree) -> dict:
    from flax import traverse_util

    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def test_ptuning_on_int4_base_keeps_it_bit_identical_and_learns(chatglm2_base, tmp_path):
    from train.trainer import train

    data = tmp_path / "one.jsonl"  # one record, every batch the same: the loss must fall
    data.write_text((EXAMPLES / "chatglm3_advertise_gen.jsonl").read_text().splitlines()[0] + "\n")
    run = tmp_path / "run"
    tc = _build(
        f"model={chatglm2_base}", "objective=sft", "data.format=chatglm3_finetune_hf", f"data.source={data}",
        "seq_len=64", "batch_size=2", "steps=6", "log_every=1", "checkpoint_every=100", "learning_rate=5e-2",
        "warmup_steps=1", "schedule=constant", "ptuning.pre_seq_len=4", "quantize=int4", "scan_layers=true",
        "param_dtype=bfloat16", f"output_dir={run}",
    )  # fmt: skip
    train(tc)
    losses = [r["loss"] for r in metrics(run)]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.05, losses
    lm = glm_jax.from_pretrained(chatglm2_base, param_dtype="bfloat16", quantize="int4", scan_layers=True)
    ref = _flat(lm.params)
    saved = _saved(run)
    prefix = {p for p in saved if p.startswith("prefix_encoder/")}
    assert prefix == {"prefix_encoder/embedding"} and saved["prefix_encoder/embedding"].dtype == np.float32
    assert set(saved) - prefix == set(ref)
    kernels = [p for p in ref if p.endswith("/kernel") and p.replace("/kernel", "/kernel_scale") in ref]
    assert len(kernels) == 7  # query_key_value (as q, k, v), dense, dense_h_to_4h (gate, up), dense_4h_to_h
    floats = _flat(glm_jax.from_pretrained(chatglm2_base, scan_layers=True).params)
    for p in kernels:
        assert saved[p].dtype == np.int8 and 2 * saved[p].size == floats[p].size, p
    for p, a in ref.items():  # every base leaf bit for bit: the int4 bytes, the scales, the float leaves
        assert saved[p].dtype == a.dtype, p
        np.testing.assert_array_equal(saved[p], a, err_msg=p)


def test_chatglm_int4_checkpoint_trains_lora_as_stored(chatglm2_base, tmp_path):
    from convert.cli import main as convert_main
    from train.config import TrainConfigError
    from train.trainer import Run, train

    q4 = tmp_path / "int4"
    assert convert_main(["quantize", str(chatglm2_base), str(q4), "--bits", "4"]) == 0
    assert json.loads((q4 / "config.json").read_text())["quantization_bit"] == 4
    keys = [
        f"model={q4}", "objective=sft", "data.format=chatglm3_finetune_hf",
        f"data.source={EXAMPLES / 'chatglm3_advertise_gen.jsonl'}", "seq_len=64", "batch_size=2", "steps=2",
        "learning_rate=1e-2", "lora.rank=2", "lora.alpha=4", "lora.targets=[query_key_value]",
    ]  # fmt: skip
    run = tmp_path / "run"
    train(_build(*keys, f"output_dir={run}"))
    ref = _flat(glm_jax.from_pretrained(q4).params)
    saved = _flat(load_params(run, 2))
    assert saved["layers_0/block/attn/q/kernel"].dtype == np.int8
    for p, a in ref.items():
        np.testing.assert_array_equal(saved[p], a, err_msg=p)
    assert np.abs(saved["lora/000/B"]).max() > 0  # the adapter trained (B starts at zero)
    # its readers see the float model it trained: each int4 kernel unpacked (high nibble first) times its scale,
    # plus (alpha / r) B @ A from the run's PEFT files, written out here in numpy
    ck = open_jax(run)
    assert ck.cfg.quantization_bit == 0 and not any(p.endswith("kernel_scale") for p in ck.store.paths())
    from safetensors.numpy import load_file

    peft_ab = load_file(str(run / "adapter_model.safetensors"))
    (a_key,) = [k for k in peft_ab if k.endswith("layers.1.self_attention.query_key_value.lora_A.weight")]
    lora_a, lora_b = peft_ab[a_key], peft_ab[a_key.replace("lora_A", "lora_B")]
    packed = saved["layers_1/block/attn/q/kernel"]  # [D/2, N, H]: int4 pairs along the in dim D
    scale = saved["layers_1/block/attn/q/kernel_scale"]  # [N, H]
    assert packed.shape[1:] == scale.shape
    raw = packed.reshape(packed.shape[0], -1).view(np.uint8)  # [D/2, out]
    hi, lo = (raw >> 4).astype(np.int8), (raw & 0xF).astype(np.int8)
    hi, lo = np.where(hi > 7, hi - 16, hi), np.where(lo > 7, lo - 16, lo)
    q = np.stack([hi, lo], axis=1).reshape(2 * raw.shape[0], -1).astype(np.float32)  # element 2j: high nibble
    D, n_q = q.shape[0], q.shape[1]
    delta = (4 / 2) * (lora_b @ lora_a)[:n_q].T  # alpha / r = 4 / 2; q's rows lead the fused [Q|K|V] output
    want = q * scale.reshape(-1)[None, :] + delta
    got = np.asarray(ck.store.read("layers_1/block/attn/q/kernel")).reshape(D, -1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
    lm = glm_jax.from_pretrained(run)
    assert lm.config.quantization_bit == 0 and lm.params["layers_1"]["block"]["attn"]["q"]["kernel"].dtype != np.int8
    # and to-torch writes that float model in the family's own float layout
    out = tmp_path / "torch"
    assert convert_main(["to-torch", str(run), str(out)]) == 0
    assert json.loads((out / "config.json").read_text()).get("quantization_bit") in (0, None)
    back = glm_jax.from_pretrained(out)
    assert back.config.quantization_bit == 0
    ids = np.random.default_rng(0).integers(3, lm.config.vocab_size, size=(1, 10))
    np.testing.assert_array_equal(np.asarray(back(ids)), np.asarray(lm(ids)))
    assert (run / "adapter_model.safetensors").is_file()
    with pytest.raises(TrainConfigError, match="quantize=int8.*already stores int4"):
        Run(_build(*keys, "quantize=int8", f"output_dir={tmp_path / 'r2'}"))
    plain = [k for k in keys if not k.startswith("lora.")]
    with pytest.raises(TrainConfigError, match="stores int4 weights.*only\\s+through an adapter"):
        Run(_build(*plain, f"output_dir={tmp_path / 'r3'}"))


# ---------------------------------------------------------------- (c) compile_only and the config error
def _compile_only(folder, out, *keys):
    from train.main import main

    rc = main(
        [
            "--config", "chatglm3_6b_ptuning", f"model={folder}", f"output_dir={out}", "topology=v5e:2x2",
            "mesh.fsdp=1", "batch_size=2", "seq_len=64", "ptuning.pre_seq_len=4", "param_dtype=bfloat16",
            "flops_extrapolate=false", "progress=none", f"compilation_cache_dir={CACHE}", "compile_only=true", *keys,
        ]
    )  # fmt: skip
    assert rc == 0
    return json.loads((out / "compile_report.json").read_text())


def test_compile_only_prices_the_int4_base_below_bf16(chatglm2_base, tmp_path):
    # wider layers than the base folder's (compile_only reads no weights), so that the weights, not TPU tile
    # padding of tiny arrays, make the difference
    D, F, N, K, H, L = 512, 2048, 8, 2, 64, 2
    wide = [f"model_overrides.{k}={v}" for k, v in dict(hidden_size=D, ffn_size=F, num_heads=N, head_dim=H).items()]
    bf16 = _compile_only(chatglm2_base, tmp_path / "bf16", *wide)
    int4 = _compile_only(chatglm2_base, tmp_path / "int4", *wide, "quantize=int4")
    assert bf16["devices"] == int4["devices"] == 1 and int4["fits"] is True
    assert int4["peak_memory_bytes_per_device"] < bf16["peak_memory_bytes_per_device"]
    # the step's arguments shrink by what the layer linears save: 2 bytes a weight -> half a byte, plus a bf16
    # scale per output channel (counted from the config; tile padding of small arrays: within 1%)
    assert json.loads((chatglm2_base / "config.json").read_text())["multi_query_group_num"] == K
    outs = [(N + 2 * K) * H, D, 2 * F, D]  # query_key_value, dense, dense_h_to_4h, dense_4h_to_h
    ins = [D, N * H, D, F]
    saved = L * sum(o * i * 1.5 - 2 * o for o, i in zip(outs, ins))
    got = bf16["memory_bytes"]["argument"] - int4["memory_bytes"]["argument"]
    assert abs(got - saved) <= 0.01 * saved, (got, saved)


def test_quantize_without_an_adapter_is_a_config_error(tmp_path, capsys):
    from train.main import main

    rc = main(["--config", "tiny", f"output_dir={tmp_path}", "quantize=int4", "steps=1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "quantize=int4" in err and "adapter" in err and "full-parameter" in err
