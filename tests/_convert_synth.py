"""Helpers for tests/test_convert_faults.py: a synthetic checkpoint large enough to interrupt, params comparison,
and a snapshot of a folder tree (to prove that nothing in it changed)."""

import hashlib
import json
import pathlib

import numpy as np


def build_checkpoint(src: pathlib.Path, layers=4, hidden=1024, vocab=16384, ffn=2816) -> int:
    """A ChatGLM2-family checkpoint (the chatglm2_6b preset's config.json, scaled down), float32 random values,
    one model.safetensors written by the safetensors library (~310 MB with the defaults). Returns its bytes."""
    import safetensors.numpy

    from glm_jax import GLMConfig
    from glm_jax.checkpoint.orbax import flatten
    from glm_jax.families import keymap, presets
    from glm_jax.model.transformer import param_shapes, unstack_layers

    hf = {
        **presets()["chatglm2_6b"],
        "num_layers": layers,
        "hidden_size": hidden,
        "kv_channels": 64,
        "num_attention_heads": hidden // 64,
        "multi_query_group_num": 2,
        "ffn_hidden_size": ffn,
        "padded_vocab_size": vocab,
        "vocab_size": vocab,
        "seq_length": 2048,
        "torch_dtype": "float32",
    }
    cfg = GLMConfig.from_hf(hf)
    flat = {}
    flatten(unstack_layers(param_shapes(cfg)), "", flat)
    rng = np.random.default_rng(0)
    arrays = {}
    for r in keymap(cfg):
        outs = r.save(cfg, [np.empty(flat[p].shape, np.dtype([])) for p in r.jax])
        for k, o in zip(r.hf, outs):
            arrays[k] = rng.standard_normal(o.shape, dtype=np.float32)
    src.mkdir(parents=True)
    (src / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    safetensors.numpy.save_file(arrays, src / "model.safetensors", metadata={"format": "pt"})
    return sum(a.nbytes for a in arrays.values())


def same_params(a, b) -> bool:
    """Two params trees (nested dicts of arrays) hold the same paths and the same bytes."""
    if isinstance(a, dict) or isinstance(b, dict):
        return (
            isinstance(a, dict)
            and isinstance(b, dict)
            and a.keys() == b.keys()
            and all(same_params(a[k], b[k]) for k in a)
        )
    x, y = np.asarray(a), np.asarray(b)
    return x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y)


def tree_snapshot(root: pathlib.Path) -> dict:
    """{relative path: sha1 of a file, '->target' of a link, 'dir' of a folder} for everything under root."""
    out = {}
    for p in sorted(pathlib.Path(root).rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "->" + str(p.readlink())
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out
