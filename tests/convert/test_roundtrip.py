"""glm-convert round trips on every fixture folder: PyTorch → JAX → PyTorch, compared with the fixture files.

The expected side is always the fixture itself, read with the safetensors library / torch.load (never with
glm-jax's own readers): files byte for byte where the output format is the source's, otherwise keys, key order,
dtypes, shapes and tensor bytes; config.json keys and values. The JAX copies must give the golden logits.
"""

import json

import numpy as np
import pytest
from helpers.fixture_models import FIX, MODEL_FIXTURES, TOL, folders, io, max_diff, reference_inputs
from helpers.reference_files import read_tensors, safetensors_lib_order

from convert.cli import main

CASES = [(n, s) for n in MODEL_FIXTURES for s in folders(n)]


@pytest.fixture(scope="module")
def jax_copies(tmp_path_factory):
    root = tmp_path_factory.mktemp("jax")
    out = {}
    for name, sub in CASES:
        dst = root / f"{name}-{sub}"
        assert main(["to-jax", str(FIX / name / sub), str(dst)]) == 0
        out[name, sub] = dst
    return out


@pytest.mark.parametrize("fmt", ["bin", "safetensors", "safetensors-blocks"])
@pytest.mark.parametrize("name,sub", CASES)
def test_round_trip_is_bit_identical(name, sub, fmt, jax_copies, tmp_path, monkeypatch):
    """safetensors-blocks: every tensor counts as large, so identity and linear rows are read block by block
    straight into their output (the path real 500 MB tensors take) and nothing overlaps."""
    if fmt == "safetensors-blocks":
        import convert.export
        import convert.torch_io

        monkeypatch.setattr(convert.torch_io, "BIG", 1)
        monkeypatch.setattr(convert.export, "BLOCK_BYTES", 64)
        fmt = "safetensors"
    src = FIX / name / sub
    out = tmp_path / "out"
    assert main(["to-torch", str(jax_copies[name, sub]), str(out), "--format", fmt]) == 0
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    for extra in ("generation_config.json",):
        if (src / extra).exists():
            assert (out / extra).read_bytes() == (src / extra).read_bytes()
    want, got = read_tensors(src), read_tensors(out)
    assert got["t"] == want["t"]  # keys, dtypes, shapes, bytes
    source_format = "bin" if any(src.glob("*.bin")) else "safetensors"
    if fmt == source_format:  # the source layout itself, file for file
        weights = sorted(p.name for p in src.iterdir() if p.suffix in (".bin", ".safetensors"))
        assert sorted(p.name for p in out.iterdir() if p.suffix in (".bin", ".safetensors")) == weights
        for w in weights:
            assert (out / w).read_bytes() == (src / w).read_bytes(), w
        for idx in src.glob("*.index.json"):
            assert json.loads((out / idx.name).read_text()) == json.loads(idx.read_text())
    elif fmt == "bin":  # sharded safetensors → one .bin in the source's order
        assert got["order"] == want["order"]
        assert [p.name for p in out.glob("*.bin")] == ["pytorch_model.bin"]
    else:  # .bin → model.safetensors as the safetensors library lays it out
        assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
        assert got["order"] == safetensors_lib_order(want["t"])


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_jax_copy_gives_golden_logits(name, jax_copies):
    import glm_jax

    d = io(name)
    kw, real = reference_inputs(name, d)
    lm = glm_jax.from_pretrained(jax_copies[name, "model"])
    assert max_diff(lm(d["input_ids"], **kw), d["logits"], real) <= TOL.get(name, 1e-4)


@pytest.mark.parametrize("name", [n for n in MODEL_FIXTURES if "model_sharded_safetensors" in folders(n)])
def test_both_fixture_folders_give_identical_params(name, jax_copies):
    import jax

    from glm_jax.checkpoint.orbax import load_jax

    c1, p1 = load_jax(jax_copies[name, "model"])
    c2, p2 = load_jax(jax_copies[name, "model_sharded_safetensors"])
    assert c1 == c2
    a, b = jax.tree.leaves_with_path(p1), jax.tree.leaves_with_path(p2)
    assert [k for k, _ in a] == [k for k, _ in b]
    for (k, x), (_, y) in zip(a, b):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), k


def test_jax_folder_contents(jax_copies):
    d = jax_copies["glm-4-9b-chat-remote", "model_sharded_safetensors"]
    meta = json.loads((d / "glm_jax.json").read_text())
    src = FIX / "glm-4-9b-chat-remote" / "model_sharded_safetensors"
    assert meta["source"]["format"] == "safetensors"
    assert meta["source"]["index"] == json.loads((src / "model.safetensors.index.json").read_text())
    assert [f["name"] for f in meta["source"]["files"]] == sorted(p.name for p in src.glob("*.safetensors"))
    assert list(meta["source"]["buffers"]) == ["transformer.rotary_pos_emb.inv_freq"]
    assert json.loads((d / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert (d / "generation_config.json").read_bytes() == (src / "generation_config.json").read_bytes()
    assert (d / "params").is_dir()
    # the params are a plain Orbax checkpoint in per-layer layout
    import orbax.checkpoint as ocp

    tree = ocp.PyTreeCheckpointer().metadata((d / "params").absolute()).item_metadata.tree
    assert {"embed", "layers_0", "layers_1", "final_norm", "lm_head"} <= set(tree)
    ref = np.asarray(
        __import__("torch").load(FIX / "glm-4-9b-chat-remote/model/pytorch_model.bin", weights_only=True)[
            "transformer.embedding.word_embeddings.weight"
        ]
    )
    restored = ocp.PyTreeCheckpointer().restore((d / "params").absolute())
    np.testing.assert_array_equal(np.asarray(restored["embed"]["embedding"]), ref)


def test_glm4_moe_export_without_a_manifest_loads_in_transformers(jax_copies, tmp_path):
    """A JAX folder without the source manifest (as glm-train writes) exports in the family's standard layout: the
    fixture's tensors, per-expert keys and the MTP layer (which transformers' forward ignores) included, and
    transformers' Glm4MoeForCausalLM loads it and gives the fixture's logits."""
    import shutil

    import torch
    import transformers

    name = "transformers-glm4-moe"
    bare = tmp_path / "bare"
    shutil.copytree(jax_copies[name, "model"], bare)
    meta = json.loads((bare / "glm_jax.json").read_text())
    meta["source"] = None
    (bare / "glm_jax.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    assert main(["to-torch", str(bare), str(out)]) == 0
    want, got = read_tensors(FIX / name / "model"), read_tensors(out)
    assert got["t"] == want["t"]
    assert got["order"] == safetensors_lib_order(want["t"])
    assert sum(k.startswith("model.layers.3.") for k in got["t"]) == 11 + 29 + 6  # MTP: attention, MoE, extras
    assert sum(".mlp.experts." in k for k in got["t"]) == 3 * 3 * 8
    d = io(name)
    model = transformers.Glm4MoeForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(torch.tensor(d["input_ids"]), attention_mask=torch.tensor(d["attention_mask"])).logits.numpy()
    real = d["attention_mask"] == 1
    assert np.abs(logits - d["logits"])[real].max() <= 1e-5


def test_glm4_moe_jax_copy_keeps_the_mtp_layer(jax_copies):
    import glm_jax

    for sub in ("model", "model_sharded_safetensors"):
        lm = glm_jax.from_pretrained(jax_copies["transformers-glm4-moe", sub])
        assert lm.config.num_mtp_layers == 1 and "mtp_0" in lm.params
