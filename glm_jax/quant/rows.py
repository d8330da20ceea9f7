"""Key-map rows of quantized checkpoints, and which params a quantized model holds as int8.

ChatGLM's quantized checkpoints (`quantization_bit` 4 or 8; specs/CHATGLM_ARCH.md §8) replace every per-layer
linear (fused qkv, attention output, both MLP projections) with an int8 `.weight` ([out, in], or [out, in/2]
packed int4) and a `.weight_scale` [out]; embeddings, norms and the output layer stay floating point. The same
set of linears is what `from_pretrained(..., quantize=)` quantizes in any family: the per-layer rows of the key
map whose params are Dense kernels.

A quantized row wraps the family's float row: the int8 values go through the float row's own transform (fused
qkv split, transposes, [gate|up] split), int4 unpacked first and packed again along the kernel's last in-dim
(the same pairs of input features, so the same bytes); each output row's scale follows its output row, found
by sending the row indices through the same transform.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from glm_jax.checkpoint import layout
from glm_jax.families.rows import Row
from glm_jax.quant import formats as quant
from glm_jax.quant.formats import SCALE, scale_path

_INDEX_CACHE: dict = {}


def bits_from_hf(d: dict) -> int:
    """config.json's quantization_bit (ChatGLM remote code): 0 / absent / null for float weights, 4 or 8."""
    from glm_jax.errors import ConfigError

    bits = d.get("quantization_bit") or 0
    if bits not in (0, 4, 8) or isinstance(bits, bool):
        raise ConfigError(f"quantization_bit must be 0, 4 or 8, got {bits!r}")
    if bits and d.get("quantization_embeddings"):
        raise ConfigError(
            "quantization_embeddings=true (chatglm-6b-int4-qe: int4 word embeddings) is not supported; "
            "use a checkpoint whose embeddings are float (chatglm-6b-int4 / -int8)"
        )
    return bits


def bits_to_hf(c) -> int | None:
    """quantization_bit as config.json writes it (a null stays null while the model is not quantized)."""
    if c.quantization_bit or not c.hf_config or "quantization_bit" not in c.hf_config:
        return c.quantization_bit
    return c.hf_config["quantization_bit"]


def is_layer_linear(r: Row) -> bool:
    """An expanded row holding one per-layer linear weight: one `.weight` key, every param a layer's kernel.
    A MoE router's kernel is not one: it stays float, as the routed experts do (its logits pick the experts, a
    discrete choice that int8 rounding would flip; it is [D, E], a small share of the layer)."""
    return (
        len(r.hf) == 1
        and r.hf[0].endswith(".weight")
        and all(
            p.endswith("/kernel") and not p.endswith("/router/kernel") and layout.parse_layer_path(p) for p in r.jax
        )
    )


def _in_dims(shape, n_in_features: int) -> int:
    """How many leading dims of a kernel shape make up `n_in_features`."""
    p = 1
    for i, d in enumerate(shape):
        p *= d
        if p == n_in_features:
            return i + 1
    raise ValueError(f"kernel shape {tuple(shape)} does not start with {n_in_features} input features")


def out_index(r: Row, cfg, hf_shape) -> list:
    """For each of the row's kernels: (n_in, int array [out...] of the HF output row behind each output)."""
    out, n_in_features = hf_shape
    key = (r.to_jax, tuple(hf_shape), cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_size)
    if key not in _INDEX_CACHE:
        dt = np.uint16 if out < 2**16 else np.int32
        rows = np.ascontiguousarray(np.broadcast_to(np.arange(out, dtype=dt)[:, None], (out, n_in_features)))
        res = []
        for k in r.load(cfg, [rows]):
            n_in = _in_dims(k.shape, n_in_features)
            res.append((n_in, np.ascontiguousarray(k[(0,) * n_in]).astype(np.int64)))
        _INDEX_CACHE[key] = res
    return _INDEX_CACHE[key]


def _shape_only(a) -> bool:
    return isinstance(a, np.ndarray) and a.dtype.itemsize == 0


def quantized_row(r: Row, bits: int) -> Row:
    """The stored-quantized form of a float linear row: HF (weight, weight_scale) <-> (kernels, kernel_scales)."""
    n = len(r.jax)

    def to_jax(cfg, arrays):
        w, s = arrays
        if _shape_only(w):  # shapes only (glm-convert's validation pass): no data, no dtype to check
            hf = (w.shape[0], w.shape[1] * (2 if bits == 4 else 1))
            kernels = r.load(cfg, [np.empty(hf, w.dtype)])
            n_ins = [_in_dims(k.shape, hf[1]) for k in kernels]
            if bits == 4:
                kernels = [_halve_last_in(k, n_in) for k, n_in in zip(kernels, n_ins)]
            return list(kernels) + [np.empty(k.shape[n_in:], w.dtype) for k, n_in in zip(kernels, n_ins)]
        if w.dtype != np.int8:
            raise ValueError(f"{r.hf[0]}: quantization_bit={bits} needs int8 storage, found {w.dtype}")
        w8 = quant.unpack_int4(w) if bits == 4 else np.asarray(w)
        if s.shape != (w8.shape[0],):
            raise ValueError(f"{r.hf[0]}_scale: expected shape ({w8.shape[0]},), found {tuple(s.shape)}")
        kernels = r.load(cfg, [w8])
        idx = out_index(r, cfg, w8.shape)
        if bits == 4:
            kernels = [quant.pack_int4(k, n_in - 1) for k, (n_in, _) in zip(kernels, idx)]
        return list(kernels) + [np.ascontiguousarray(np.asarray(s)[i]) for _, i in idx]

    def to_hf(cfg, arrays):
        ks, ss = arrays[:n], arrays[n:]
        if bits == 4:
            ks = [k if _shape_only(k) else quant.unpack_int4(k, k.ndim - s.ndim - 1) for k, s in zip(ks, ss)]
            if _shape_only(ks[0]):
                ks = [_double_last_in(k, s) for k, s in zip(ks, ss)]
        (w8,) = r.save(cfg, list(ks))
        if _shape_only(w8):
            return [np.empty((w8.shape[0], w8.shape[1] // (2 if bits == 4 else 1)), w8.dtype), np.empty(w8.shape[:1])]
        s_hf = np.zeros(w8.shape[0], np.asarray(ss[0]).dtype)
        for (_, i), s in zip(out_index(r, cfg, w8.shape), ss):
            s_hf[i.reshape(-1)] = np.asarray(s).reshape(-1)
        return [quant.pack_int4(w8) if bits == 4 else w8, s_hf]

    to_jax.float_row = r  # quantized_shapes reads the float row's shapes through it
    return dataclasses.replace(
        r,
        hf=(r.hf[0], r.hf[0] + "_scale"),
        jax=tuple(r.jax) + tuple(scale_path(p) for p in r.jax),
        to_jax=to_jax,
        to_hf=to_hf,
    )


def _halve_last_in(k, n_in):
    shape = list(k.shape)
    shape[n_in - 1] //= 2
    return np.empty(shape, k.dtype)


def _double_last_in(k, s):
    n_in = k.ndim - s.ndim
    shape = list(k.shape)
    shape[n_in - 1] *= 2
    return np.empty(shape, k.dtype)


def source_key(r: Row, path: str) -> str:
    """The HF key whose dtype the param at `path` keeps (a quantized row's scales: the `.weight_scale`)."""
    return r.hf[1] if path.endswith("/" + SCALE) and len(r.hf) == 2 else r.hf[0]


def stored_rows(rows: list, cfg) -> list:
    """Expanded rows as a checkpoint with cfg.quantization_bit stores them (the float rows when it is 0)."""
    bits = cfg.quantization_bit
    if not bits:
        return rows
    return [quantized_row(r, bits) if is_layer_linear(r) else r for r in rows]


def float_row(r: Row) -> Row | None:
    """The float row a stored-quantized row wraps (None for any other row)."""
    return getattr(r.to_jax, "float_row", None)


def quantized_shapes(shapes: dict, cfg, rows: list) -> dict:
    """Per-layer param shapes (jax.ShapeDtypeStruct leaves, `layers_{i}` layout) of the model with its layer
    linears quantized: int8 kernels (4 bits: last in-dim halved) and their scales. `rows`: families.keymap(cfg)."""
    import jax

    bits = cfg.quantization_bit
    if not bits:
        return shapes
    out = _copy_dicts(shapes)
    for r in rows:
        fr = float_row(r)
        if fr is None:
            continue
        kshapes = [_leaf(shapes, p).shape for p in fr.jax]
        _, n_in_features = _hf_shape(fr, cfg, kshapes)
        for p, ks in zip(fr.jax, kshapes):
            *parent, leaf = p.split("/")
            node = out
            for q in parent:
                node = node[q]
            n_in = _in_dims(ks, n_in_features)
            shape = list(ks)
            if bits == 4:
                shape[n_in - 1] //= 2
            node[leaf] = jax.ShapeDtypeStruct(tuple(shape), np.int8)
            node[SCALE] = jax.ShapeDtypeStruct(tuple(ks[n_in:]), np.float32)
    return out


def _hf_shape(r: Row, cfg, kernel_shapes) -> tuple:
    """The HF [out, in] shape of a float linear row, from its kernels' shapes (no data touched)."""
    stand_ins = [np.empty(s, np.dtype([])) for s in kernel_shapes]
    (w,) = r.save(cfg, stand_ins)
    return tuple(w.shape)


def _leaf(tree, path):
    for q in path.split("/"):
        tree = tree[q]
    return tree


def quantize_params(params: dict, cfg, rows: list, bits: int) -> dict:
    """Per-layer float params -> the same tree with every layer linear's kernel int8 (4 bits: packed) beside a
    float32 per-output-channel `kernel_scale` (glm_jax.quant.formats.quantize_kernel). Other leaves are untouched."""
    quant.check_bits(bits)
    out = _copy_dicts(params)
    for r in rows:
        if not is_layer_linear(r):
            continue
        kshapes = [np.shape(_leaf(params, p)) for p in r.jax]
        _, n_in_features = _hf_shape(r, cfg, kshapes)
        for p in r.jax:
            *parent, leaf = p.split("/")
            node = out
            for q in parent:
                node = node[q]
            k = np.asarray(node[leaf])
            if not np.issubdtype(k.dtype, np.floating) and k.dtype.name != "bfloat16":
                raise ValueError(f"{p}: already quantized ({k.dtype}); load it without quantize=")
            node[leaf], node[SCALE] = quant.quantize_kernel(k, _in_dims(k.shape, n_in_features), bits)
    return out


def _copy_dicts(t):
    return {k: _copy_dicts(v) for k, v in t.items()} if isinstance(t, dict) else t
