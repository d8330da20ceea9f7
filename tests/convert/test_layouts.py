"""glm-convert beyond the plain round trip: --layout glm-hf (loaded by transformers), Megatron model-parallel
checkpoints, P-Tuning v2 prefixes, glm-train run directories, --mesh chunking, --dtype and re-sharding.

Expected values come from the fixtures (golden logits, the fixture's own files) and from transformers.
"""

import argparse
import json
import shutil

import numpy as np
import pytest
from helpers.fixture_models import FIX, TOL, io, max_diff, reference_inputs
from helpers.reference_files import read_tensors

from convert.cli import main


def _to_jax(src, dst, *extra):
    assert main(["to-jax", str(src), str(dst), *map(str, extra)]) == 0
    return dst


def _to_torch(src, dst, *extra):
    assert main(["to-torch", str(src), str(dst), *map(str, extra)]) == 0
    return dst


def _logits_ok(path, name, ref_key="logits", **kw):
    import glm_jax

    d = io(name)
    inputs, real = reference_inputs(name, d)
    lm = glm_jax.from_pretrained(path, **kw)
    assert max_diff(lm(d["input_ids"], **inputs), d[ref_key], real) <= TOL.get(name, 1e-4)


# ------------------------------------------------------------------ --layout glm-hf → transformers
def test_glm_hf_layout_loads_in_transformers(tmp_path):
    import torch
    from transformers import GlmForCausalLM

    name = "glm-4-9b-chat-remote"
    j = _to_jax(FIX / name / "model", tmp_path / "jax")
    out = _to_torch(j, tmp_path / "hf", "--layout", "glm-hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "glm" and cfg["architectures"] == ["GlmForCausalLM"]
    assert cfg["rope_theta"] == 10000.0 * 500 and cfg["partial_rotary_factor"] == 0.5 and cfg["head_dim"] == 16
    assert cfg["rms_norm_eps"] == 1.5625e-07 and cfg["dtype"] == "float32"
    model = GlmForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    d = io(name)
    with torch.no_grad():
        logits = model(
            input_ids=torch.tensor(d["input_ids"]),
            attention_mask=torch.tensor(d["attention_mask"]),
            position_ids=torch.tensor(d["position_ids"]),
        ).logits.numpy()
    assert max_diff(logits, d["logits"], d["attention_mask"] == 1) <= 1e-4
    assert not (out / "modeling_chatglm.py").exists()
    # and back: the glm-hf export converts to JAX again and matches the golden logits
    _logits_ok(_to_jax(out, tmp_path / "jax2"), name)


# ------------------------------------------------------------------ Megatron, 2-way model parallel
def _split_megatron(sd, m):
    """THUDM/GLM mp split, written here from its rule: rows, columns, per-rank [Q_r; K_r; V_r]."""
    import torch

    ranks = [{} for _ in range(m)]
    for key, v in sd.items():
        k = key[len("glm.") :]
        if k.endswith("attention.query_key_value.weight") or k.endswith("attention.query_key_value.bias"):
            q, kk, vv = (t.chunk(m, dim=0) for t in v.chunk(3, dim=0))
            parts = [torch.cat([q[r], kk[r], vv[r]]) for r in range(m)]
        elif k == "word_embeddings.weight" or k.endswith(("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias")):
            parts = v.chunk(m, dim=0)
        elif k.endswith(("attention.dense.weight", "mlp.dense_4h_to_h.weight")):
            parts = v.chunk(m, dim=1)
        else:
            parts = [v] * m
        for r in range(m):
            ranks[r][k] = parts[r].clone()
    return ranks


def test_megatron_two_way_model_parallel(tmp_path):
    import torch

    sd = torch.load(FIX / "glm-original/model/pytorch_model.bin", weights_only=True)
    root = tmp_path / "megatron"
    for tag, shards in (
        ("3", _split_megatron({k: torch.zeros_like(v) for k, v in sd.items()}, 2)),
        ("5", _split_megatron(sd, 2)),
    ):
        (root / tag).mkdir(parents=True)
        for r, module in enumerate(shards):
            torch.save(
                {
                    "module": module,
                    "iteration": int(tag),
                    "np_rng_state": np.random.get_state(),
                    "args": argparse.Namespace(lr=1e-4, model_parallel_size=2),
                },
                root / tag / f"mp_rank_{r:02d}_model_states.pt",
            )
    (root / "latest_checkpointed_iteration.txt").write_text("5")
    cfg_file = tmp_path / "glm-config.json"
    shutil.copy(FIX / "glm-original/model/config.json", cfg_file)
    j = _to_jax(root, tmp_path / "jax", "--config", cfg_file)  # no config.json beside it: --config
    _logits_ok(j, "glm-original", ref_key="logits_megatron_tanh_gelu")  # Megatron computes tanh GELU
    # exported in the HF remote-code layout, the merged tensors are the fixture's own
    out = _to_torch(j, tmp_path / "hf", "--format", "bin")
    want, got = read_tensors(FIX / "glm-original/model"), read_tensors(out)
    assert got["t"] == want["t"] and got["order"] == want["order"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.pop("gelu_variant") == "gelu_tanh"
    assert cfg == json.loads((FIX / "glm-original/model/config.json").read_text())


# ------------------------------------------------------------------ P-Tuning v2
@pytest.fixture(scope="module")
def ptuning_jax(tmp_path_factory):
    import torch

    tmp = tmp_path_factory.mktemp("pt")
    src = FIX / "chatglm2-6b-ptuning-v2"
    base = tmp / "base"
    base.mkdir()
    sd = torch.load(src / "model/pytorch_model.bin", weights_only=True)
    torch.save(
        {k: v for k, v in sd.items() if not k.startswith("transformer.prefix_encoder.")}, base / "pytorch_model.bin"
    )
    cfg = json.loads((src / "model/config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "pre_seq_len": None}, indent=2))
    shutil.copy(src / "model/generation_config.json", base)
    return _to_jax(base, tmp / "jax", "--ptuning", src / "ptuning_checkpoint")


def test_ptuning_on_top_of_base(ptuning_jax):
    src = FIX / "chatglm2-6b-ptuning-v2"
    assert json.loads((ptuning_jax / "config.json").read_text()) == json.loads((src / "model/config.json").read_text())
    _logits_ok(ptuning_jax, "chatglm2-6b-ptuning-v2")


def test_ptuning_only_export(ptuning_jax, tmp_path):
    src = FIX / "chatglm2-6b-ptuning-v2"
    out = _to_torch(ptuning_jax, tmp_path / "prefix", "--ptuning-only")
    assert (out / "pytorch_model.bin").read_bytes() == (src / "ptuning_checkpoint/pytorch_model.bin").read_bytes()
    # the full export is base + prefix: the fixture's own checkpoint
    full = _to_torch(ptuning_jax, tmp_path / "full", "--format", "bin")
    assert (full / "pytorch_model.bin").read_bytes() == (src / "model/pytorch_model.bin").read_bytes()


# ------------------------------------------------------------------ glm-train run directories
def _train_run(tmp_path, name, scan):
    """A run directory as glm-train writes it: Orbax CheckpointManager steps with items params and meta."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from glm_jax.checkpoint import layout
    from glm_jax.checkpoint.hf import config_from_folder, load_params

    cfg = config_from_folder(FIX / name / "model").replace(scan_layers=scan)
    params = load_params(cfg, FIX / name / "model")
    if scan:
        params = layout.stack(params, cfg)
    params = jax.tree.map(jnp.asarray, params)
    run = tmp_path / "run"
    mgr = ocp.CheckpointManager((run / "checkpoints").absolute(), item_names=("params", "meta"))
    for step, p in ((3, jax.tree.map(jnp.zeros_like, params)), (7, params)):
        mgr.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(p), meta=ocp.args.JsonSave({"step": step, "config": cfg.to_dict()})
            ),
        )
    mgr.wait_until_finished()
    (run / "checkpoints" / "9.orbax-checkpoint-tmp-1").mkdir()  # an interrupted save: not a complete step
    return run


@pytest.mark.parametrize("name,scan", [("chatglm-6b", True), ("chatglm2-6b", False)])
def test_glm_train_run_exports_the_reference_layout(name, scan, tmp_path):
    run = _train_run(tmp_path, name, scan)
    out = _to_torch(run, tmp_path / "hf", "--format", "bin")
    # no manifest: the standard layout, buffers recomputed as the reference does, byte for byte its own file
    assert (out / "pytorch_model.bin").read_bytes() == (FIX / name / "model/pytorch_model.bin").read_bytes()
    assert json.loads((out / "config.json").read_text()) == json.loads((FIX / name / "model/config.json").read_text())


def test_load_jax_reads_a_glm_train_run(tmp_path):
    from glm_jax.api import GLM, cast_params
    from glm_jax.checkpoint.orbax import load_jax

    name = "glm-4-9b-chat-remote"
    cfg, params = load_jax(_train_run(tmp_path, name, True))  # the latest complete step (7), stacked layers
    assert cfg.scan_layers and params["layers"]["block"]["attn"]["q"]["kernel"].shape[0] == cfg.num_layers
    d = io(name)
    inputs, real = reference_inputs(name, d)
    assert max_diff(GLM(cfg, cast_params(params, cfg))(d["input_ids"], **inputs), d["logits"], real) <= 1e-4


def test_from_pretrained_reads_a_glm_train_run(tmp_path):
    import glm_jax

    name = "chatglm2-6b"
    lm = glm_jax.from_pretrained(_train_run(tmp_path, name, False))  # latest complete step (7), not the zeros of 3
    d = io(name)
    inputs, real = reference_inputs(name, d)
    assert max_diff(lm(d["input_ids"], **inputs), d["logits"], real) <= 1e-4


# ------------------------------------------------------------------ --mesh, --dtype, re-sharding
def test_mesh_chunks_params_as_shards(tmp_path):
    import orbax.checkpoint as ocp

    from glm_jax.checkpoint.orbax import load_jax

    src = FIX / "chatglm2-6b/model"
    plain, meshed = _to_jax(src, tmp_path / "plain"), _to_jax(src, tmp_path / "mesh", "--mesh", "1,2,2")
    assert json.loads((meshed / "glm_jax.json").read_text())["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    tree = ocp.PyTreeCheckpointer().metadata((meshed / "params").absolute()).item_metadata.tree
    assert tree["embed"]["embedding"].storage.chunk_shape == (256, 32)  # vocab→tensor, embed→fsdp
    assert tree["layers_0"]["block"]["attn"]["q"]["kernel"].storage.chunk_shape == (32, 2, 16)
    (_, a), (_, b) = load_jax(plain), load_jax(meshed)
    import jax

    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_dtype_and_resharding(tmp_path):
    import torch

    name = "chatglm3-6b-32k"
    src = FIX / name / "model"
    j16 = _to_jax(src, tmp_path / "bf16", "--dtype", "bfloat16")
    from glm_jax.checkpoint.orbax import load_jax

    _, p = load_jax(j16)
    ref = torch.load(src / "pytorch_model.bin", weights_only=True)
    emb = ref["transformer.embedding.word_embeddings.weight"].to(torch.bfloat16).float().numpy()
    assert p["embed"]["embedding"].dtype.name == "bfloat16"
    np.testing.assert_array_equal(p["embed"]["embedding"].astype(np.float32), emb)
    # back to torch: the manifest's dtypes (float32), or --dtype
    back = read_tensors(_to_torch(j16, tmp_path / "f32"))
    assert back["t"]["transformer.embedding.word_embeddings.weight"][0] == "torch.float32"
    out = _to_torch(j16, tmp_path / "sharded", "--dtype", "bfloat16", "--max-shard-size", "100KB")
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and sorted(set(idx["weight_map"].values())) == [s.name for s in shards]
    got = read_tensors(out)
    assert set(got["t"]) == set(ref) and all(dt == "torch.bfloat16" for dt, _, _ in got["t"].values())
    assert idx["metadata"]["total_size"] == sum(len(b) for _, _, b in got["t"].values())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
