"""glm-convert on the Glm4Moe fixture: PyTorch -> JAX -> PyTorch bit for bit, per-expert keys and the MTP layer
included; the fixture files are read with the safetensors library / torch.load (helpers/reference_files.py)."""

import json
import shutil

import numpy as np
import pytest
from helpers.fixture_models import FIX
from helpers.reference_files import read_tensors, safetensors_lib_order

from convert.cli import main

NAME = "transformers-glm4-moe"


@pytest.fixture(scope="module")
def jax_copies(tmp_path_factory):
    root = tmp_path_factory.mktemp("jax")
    out = {}
    for sub in ("model", "model_sharded_safetensors"):
        assert main(["to-jax", str(FIX / NAME / sub), str(root / sub)]) == 0
        out[sub] = root / sub
    return out


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "safetensors-blocks"])
@pytest.mark.parametrize("sub", ["model", "model_sharded_safetensors"])
def test_round_trip_is_bit_identical_with_the_mtp_layer(sub, fmt, jax_copies, tmp_path, monkeypatch):
    if fmt == "safetensors-blocks":  # every tensor read block by block, as large ones are
        import convert.export
        import convert.torch_io

        monkeypatch.setattr(convert.torch_io, "BIG", 1)
        monkeypatch.setattr(convert.export, "BLOCK_BYTES", 64)
        fmt = "safetensors"
    src, out = FIX / NAME / sub, tmp_path / "out"
    assert main(["to-torch", str(jax_copies[sub]), str(out), "--format", fmt]) == 0
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    want, got = read_tensors(src), read_tensors(out)
    assert got["t"] == want["t"]  # keys, dtypes, shapes, bytes
    assert (
        sum(k.startswith("model.layers.3.") for k in got["t"]) == 11 + 29 + 6
    )  # the MTP layer: attention, MoE, extras
    assert sum(".mlp.experts." in k for k in got["t"]) == 3 * 3 * 8
    if fmt == "safetensors":  # the source's own files, byte for byte
        weights = sorted(p.name for p in src.glob("*.safetensors"))
        assert sorted(p.name for p in out.glob("*.safetensors")) == weights
        for w in weights:
            assert (out / w).read_bytes() == (src / w).read_bytes(), w
        for idx in src.glob("*.index.json"):
            assert json.loads((out / idx.name).read_text()) == json.loads(idx.read_text())
    else:
        assert got["order"] == want["order"]


def test_standard_layout_without_a_manifest_loads_in_transformers(jax_copies, tmp_path):
    """A JAX folder without the source manifest (as glm-train writes) exports in the family's standard layout:
    the same tensors, and transformers' Glm4MoeForCausalLM loads it and gives the fixture's logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    bare = tmp_path / "bare"
    shutil.copytree(jax_copies["model"], bare)
    meta = json.loads((bare / "glm_jax.json").read_text())
    meta["source"] = None
    (bare / "glm_jax.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    assert main(["to-torch", str(bare), str(out)]) == 0
    src = FIX / NAME / "model"
    want, got = read_tensors(src), read_tensors(out)
    assert got["t"] == want["t"]
    assert got["order"] == safetensors_lib_order(want["t"])
    d = dict(np.load(FIX / NAME / "io.npz"))
    model = transformers.Glm4MoeForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(torch.tensor(d["input_ids"]), attention_mask=torch.tensor(d["attention_mask"])).logits.numpy()
    real = d["attention_mask"] == 1
    assert np.abs(logits - d["logits"])[real].max() <= 1e-5


def test_jax_copy_gives_golden_logits(jax_copies):
    import glm_jax

    d = dict(np.load(FIX / NAME / "io.npz"))
    B, T = d["input_ids"].shape
    lm = glm_jax.from_pretrained(jax_copies["model_sharded_safetensors"])
    assert lm.config.num_mtp_layers == 1 and "mtp_0" in lm.params
    logits = lm(d["input_ids"], attention_mask=d["attention_mask"], position_ids=np.broadcast_to(np.arange(T), (B, T)))
    real = d["attention_mask"] == 1
    assert np.abs(np.asarray(logits) - d["logits"])[real].max() <= 1e-4
