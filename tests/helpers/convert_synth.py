"""Helpers for tests/convert/test_faults.py: malformed safetensors files (hypothesis draws), a synthetic checkpoint
large enough to interrupt, params comparison, and a snapshot of a folder tree (to prove that nothing changed)."""

import hashlib
import json
import pathlib
import struct

import numpy as np
from hypothesis import strategies as st

from glm_jax.dtypes import ST_DTYPES


def _pack(header, data: bytes, n=None) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if n is None else n) + text + data


_ITEMSIZE = {k: np.dtype(v).itemsize for k, v in ST_DTYPES.items()}
_JUNK = st.one_of(st.integers(-5, 5), st.floats(allow_nan=False), st.text(max_size=3), st.none(), st.booleans())
KINDS = [
    "negative_start",
    "reversed",
    "past_end",
    "shift",
    "overlap_only",
    "dtype_other_size",
    "dtype_unknown",
    "dtype_not_a_string",
    "shape_dim",
    "shape_type",
    "offsets_type",
    "missing_field",
    "entry_not_object",
    "header_list",
    "metadata",
    "header_length",
    "truncated",
    "trailing_bytes",
]


def malformed(kind, header, data, draw) -> bytes:
    """A header (and file) that both the safetensors library and glm-convert must refuse."""
    h = json.loads(json.dumps(header))
    names = [k for k in h if k != "__metadata__"]
    k = draw(st.sampled_from(names))
    e = h[k]
    a, b = e["data_offsets"]
    if kind == "negative_start":
        e["data_offsets"] = [-draw(st.integers(1, 2**40)), b]
    elif kind == "reversed":
        e["data_offsets"] = [b, a]
    elif kind == "past_end":
        e["data_offsets"] = [a, len(data) + draw(st.integers(1, 2**40))]
    elif kind == "shift":  # a gap on one side, an overlap (or the ends of the data) on the other
        d = draw(st.integers(1, 64)) * draw(st.sampled_from([-1, 1]))
        e["data_offsets"] = [a + d, b + d]
    elif kind == "overlap_only":  # the last tensor slides back over its neighbour; the data ends with it: no gap
        last = max(names, key=lambda n: h[n]["data_offsets"][1])
        a, b = h[last]["data_offsets"]
        d = draw(st.integers(1, a))
        h[last]["data_offsets"] = [a - d, b - d]
        return _pack(h, data[:-d])
    elif kind == "dtype_other_size":
        e["dtype"] = draw(st.sampled_from([t for t in _ITEMSIZE if _ITEMSIZE[t] != _ITEMSIZE[e["dtype"]]]))
    elif kind == "dtype_unknown":
        e["dtype"] = "X" + draw(st.text(max_size=6))
    elif kind == "dtype_not_a_string":
        e["dtype"] = draw(st.one_of(st.integers(), st.lists(st.integers(), max_size=2), st.none()))
    elif kind == "shape_dim":
        i = draw(st.integers(0, len(e["shape"]) - 1))
        e["shape"][i] += draw(st.one_of(st.integers(-e["shape"][i] - 3, -1), st.integers(1, 2**20)))
    elif kind == "shape_type":
        not_int = st.one_of(st.floats(), st.text(max_size=3), st.none(), st.booleans(), st.lists(st.integers()))
        e["shape"] = draw(st.one_of(st.lists(not_int, min_size=1, max_size=3), _JUNK))
    elif kind == "offsets_type":
        e["data_offsets"] = draw(st.one_of(st.just([float(a), b]), st.just([a, b, b]), st.just([a]), _JUNK))
    elif kind == "missing_field":
        del e[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
    elif kind == "entry_not_object":
        h[k] = draw(st.one_of(_JUNK, st.lists(st.integers(), max_size=3)))
    elif kind == "header_list":
        return _pack(draw(st.sampled_from([list(h.items()), list(h.values())])), data)
    elif kind == "metadata":
        bad = st.one_of(st.integers(), st.lists(st.text(max_size=2), max_size=2), st.booleans())
        h["__metadata__"] = draw(st.one_of(st.dictionaries(st.text(max_size=4), bad, min_size=1), bad))
    elif kind == "header_length":
        raw = _pack(h, data)
        n = struct.unpack("<Q", raw[:8])[0]
        wrong = draw(st.one_of(st.integers(0, n - 1), st.integers(len(raw) - 7, 2**64 - 1)))
        return struct.pack("<Q", wrong) + raw[8:]
    elif kind == "truncated":
        return _pack(h, data[: -draw(st.integers(1, len(data)))])
    elif kind == "trailing_bytes":
        return _pack(h, data + b"\0" * draw(st.integers(1, 4096)))
    return _pack(h, data)


def build_checkpoint(src: pathlib.Path, layers=4, hidden=1024, vocab=16384, ffn=2816) -> int:
    """A ChatGLM2-family checkpoint (the chatglm2_6b preset's config.json, scaled down), float32 random values,
    one model.safetensors written by the safetensors library (~310 MB with the defaults). Returns its bytes."""
    import safetensors.numpy

    from glm_jax import GLMConfig
    from glm_jax.checkpoint.orbax import flatten
    from glm_jax.families import keymap, presets
    from glm_jax.model.transformer import param_shapes

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
    flatten(param_shapes(cfg.replace(scan_layers=False)), "", flat)
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
