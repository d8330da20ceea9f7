"""glm-convert on the GLM-4.7-Flash and GLM-5 fixtures: PyTorch -> JAX -> PyTorch bit for bit, the MTP layer (and
GLM-5's indexers, present only on "full" layers) included; the JAX copy gives the reference's logits."""

import json

import numpy as np
import pytest
from helpers.fixture_models import FIX
from helpers.reference_files import read_tensors

from convert.cli import main

NAMES = ["transformers-glm4-moe-lite", "transformers-glm-moe-dsa"]


@pytest.fixture(scope="module")
def jax_copies(tmp_path_factory):
    root = tmp_path_factory.mktemp("jax")
    out = {}
    for name in NAMES:
        for sub in ("model", "model_sharded_safetensors"):
            dst = root / name / sub
            assert main(["to-jax", str(FIX / name / sub), str(dst)]) == 0
            out[name, sub] = dst
    return out


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("sub", ["model", "model_sharded_safetensors"])
def test_round_trip_is_bit_identical_with_the_mtp_layer(name, sub, jax_copies, tmp_path):
    src, out = FIX / name / sub, tmp_path / "out"
    assert main(["to-torch", str(jax_copies[name, sub]), str(out)]) == 0
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    want, got = read_tensors(src), read_tensors(out)
    assert got["t"] == want["t"]  # keys, dtypes, shapes, bytes
    mtp = [k for k in got["t"] if k.startswith("model.layers.3.")]
    indexer = 5 if "dsa" in name else 0
    assert len(mtp) == 9 + indexer + 29 + 6  # attention, indexer, MoE, the MTP extras
    assert sum(".indexer." in k for k in got["t"]) == 3 * indexer  # layers 0, 2 and the MTP layer; not layer 1
    weights = sorted(p.name for p in src.glob("*.safetensors"))
    assert sorted(p.name for p in out.glob("*.safetensors")) == weights
    for w in weights:
        assert (out / w).read_bytes() == (src / w).read_bytes(), w


@pytest.mark.parametrize("name", NAMES)
def test_jax_copy_gives_golden_logits(name, jax_copies):
    import glm_jax

    d = dict(np.load(FIX / name / "io.npz"))
    B, T = d["input_ids"].shape
    lm = glm_jax.from_pretrained(jax_copies[name, "model_sharded_safetensors"])
    assert lm.config.num_mtp_layers == 1 and "mtp_0" in lm.params
    logits = lm(d["input_ids"], attention_mask=d["attention_mask"], position_ids=np.broadcast_to(np.arange(T), (B, T)))
    real = d["attention_mask"] == 1
    assert np.abs(np.asarray(logits) - d["logits"])[real].max() <= 1e-4
