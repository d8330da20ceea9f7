"""Rows of a key map and the invertible transforms they use. Arrays are numpy; HF linears are [out, in]."""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from convert import direct

# Saved buffers that are not weights: recomputed by the model, restored by the converter from its manifest.
BUFFER_SUFFIXES = ("rotary_emb.inv_freq", "rotary_pos_emb.inv_freq")


@dataclasses.dataclass(frozen=True)
class Row:
    hf: tuple                    # HF key patterns; "{l}" stands for the layer index
    jax: tuple                   # param paths, "/"-separated; "{l}" likewise
    to_jax: Callable = None      # (cfg, [hf arrays]) -> [param arrays]; default identity
    to_hf: Callable = None       # (cfg, [param arrays]) -> [hf arrays]; default identity
    when: Callable = lambda cfg: True
    per_layer: bool = False

    def load(self, cfg, arrays):
        return list(arrays) if self.to_jax is None else self.to_jax(cfg, arrays)

    def save(self, cfg, arrays):
        return list(arrays) if self.to_hf is None else self.to_hf(cfg, arrays)


def expand(rows, cfg):
    out = []
    for r in rows:
        if not r.when(cfg):
            continue
        if r.per_layer:
            for l in range(cfg.num_layers):
                out.append(dataclasses.replace(r, hf=tuple(k.format(l=l) for k in r.hf),
                                               jax=tuple(k.format(l=l) for k in r.jax), per_layer=False))
        else:
            out.append(r)
    return out


def c(a):
    """Contiguous copy. A transposed view (possibly with its second axis split) is copied by copy_2d, which
    keeps the reads in cache: 2-4x faster than np.ascontiguousarray on large matrices."""
    a = np.asarray(a)
    if a.flags.c_contiguous or a.ndim < 2 or a.size < (1 << 16) or not a.itemsize or a.strides[0] != a.itemsize:
        return np.ascontiguousarray(a)
    src = _raw(a)
    shape = src.shape
    try:
        src.shape = (a.shape[0], -1)            # [cols of the source, rows of the source]; raises if not a view
    except AttributeError:
        if a.ndim != 3:
            return np.ascontiguousarray(a)
        out = direct.empty(shape, src.dtype)
        for n in range(a.shape[1]):             # [D, N, H] from per-head blocks: one transposed copy per head
            copy_2d(out[:, n], src[:, n])
        return out.view(a.dtype)
    out = direct.empty(src.shape, src.dtype)
    copy_2d(out, src)
    return out.view(a.dtype).reshape(a.shape)


def _raw(a):
    return a.view(f"u{a.itemsize}") if a.itemsize in (1, 2, 4, 8) else a


def copy_2d(out, src):
    """out[...] = src for a 2-D transposed view src: square tiles when the output is tall (its rows are long
    runs of the source), slabs of 16 output columns when it is wide (measured on [27392, 4096] and
    [4096, 27392] bf16: 0.20 s and 0.26 s, against 0.46 s and 0.31 s for slabs alone). A large copy is split
    in two halves of rows, one on a second thread (1.3-2x faster on 2 cores, measured; no extra memory).
    Small or not transposed sources are plainly assigned."""
    if src.size < (1 << 16) or src.strides[0] != src.itemsize:
        out[...] = src
        return
    out, src = _raw(out), _raw(src)
    R = src.shape[0]
    if src.nbytes < SPLIT_BYTES or R < 512:
        _tiles(out, src)
        return
    h = (R // 2 + 255) // 256 * 256
    other = _pool().submit(_tiles, out[h:], src[h:])
    try:
        _tiles(out[:h], src[:h])
    finally:
        other.result()


SPLIT_BYTES = 16 << 20
_POOL = []


def _pool():
    if not _POOL:
        import concurrent.futures
        _POOL.append(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="glm-convert-copy"))
    return _POOL[0]


def _tiles(out, src):
    R, C = src.shape
    if R >= C:
        for i in range(0, R, 256):
            for j in range(0, C, 256):
                out[i:i + 256, j:j + 256] = src[i:i + 256, j:j + 256]
    else:
        for j in range(0, C, 16):
            out[:, j:j + 16] = src[:, j:j + 16]


# ---------------------------------------------------------------- transforms
def linear(in_shape_fn, out_shape_fn):
    """HF [out, in] weight ↔ kernel [in..., out...]."""
    def to_jax(cfg, a):
        (w,) = a
        return [c(w.T).reshape(in_shape_fn(cfg) + out_shape_fn(cfg))]   # transposed as 2-D: the fast path

    def to_hf(cfg, a):
        (k,) = a
        i = int(np.prod(in_shape_fn(cfg)))
        return [c(k.reshape(i, -1).T)]
    to_hf.linear_in = in_shape_fn       # lets a reader build a large one block by block (export.Producer)
    return to_jax, to_hf


# common shape helpers
D = lambda cfg: (cfg.hidden_size,)  # noqa: E731
NH = lambda cfg: (cfg.num_heads, cfg.head_dim)  # noqa: E731
KH = lambda cfg: (cfg.num_kv_heads, cfg.head_dim)  # noqa: E731
F = lambda cfg: (cfg.ffn_size,)  # noqa: E731
V = lambda cfg: (cfg.vocab_size,)  # noqa: E731


def qkv_blocks():
    """Fused [Q (all heads) | K (all groups) | V (all groups)] rows ↔ q, k, v kernels (or biases)."""
    def sizes(cfg):
        return [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim]

    def w_to_jax(cfg, a):
        (w,) = a
        q, k, v = np.split(w, np.cumsum(sizes(cfg))[:-1], axis=0)
        return [c(q.T.reshape(D(cfg) + NH(cfg))), c(k.T.reshape(D(cfg) + KH(cfg))), c(v.T.reshape(D(cfg) + KH(cfg)))]

    def w_to_hf(cfg, a):
        return [c(np.concatenate([p.reshape(cfg.hidden_size, -1) for p in a], axis=1).T)]

    def b_to_jax(cfg, a):
        q, k, v = np.split(a[0], np.cumsum(sizes(cfg))[:-1])
        return [c(q.reshape(NH(cfg))), c(k.reshape(KH(cfg))), c(v.reshape(KH(cfg)))]

    def b_to_hf(cfg, a):
        return [c(np.concatenate([p.reshape(-1) for p in a]))]
    return (w_to_jax, w_to_hf), (b_to_jax, b_to_hf)


def qkv_per_head():
    """ChatGLM-6B: rows grouped per head as [q_h | k_h | v_h] ↔ q, k, v kernels (or biases)."""
    def w_to_jax(cfg, a):
        w = a[0].reshape(cfg.num_heads, 3, cfg.head_dim, cfg.hidden_size)
        return [c(w[:, i].transpose(2, 0, 1)) for i in range(3)]

    def w_to_hf(cfg, a):
        w = np.stack([p.transpose(1, 2, 0) for p in a], axis=1)  # [N, 3, H, D]
        return [c(w.reshape(-1, cfg.hidden_size))]

    def b_to_jax(cfg, a):
        b = a[0].reshape(cfg.num_heads, 3, cfg.head_dim)
        return [c(b[:, i]) for i in range(3)]

    def b_to_hf(cfg, a):
        return [c(np.stack(a, axis=1).reshape(-1))]
    return (w_to_jax, w_to_hf), (b_to_jax, b_to_hf)


def gate_up():
    """Fused [gate | up] rows of the SwiGLU input projection ↔ gate, up kernels."""
    def to_jax(cfg, a):
        g, u = np.split(a[0], 2, axis=0)
        return [c(g.T), c(u.T)]

    def to_hf(cfg, a):
        g, u = (np.asarray(x) for x in a)
        out = np.empty((g.shape[1] + u.shape[1], g.shape[0]), g.dtype)
        copy_2d(out[:g.shape[1]], g.T)
        copy_2d(out[g.shape[1]:], u.T)
        return [out]
    return to_jax, to_hf


def layer_rows(hf_prefix, jax_prefix, names):
    """Plain per-layer rows for (hf_suffix, jax_suffix, transform or None, when) tuples."""
    rows = []
    for hf, jx, tr, when in names:
        hfk = tuple(f"{hf_prefix}{h}" for h in (hf if isinstance(hf, tuple) else (hf,)))
        jxk = tuple(f"{jax_prefix}{j}" for j in (jx if isinstance(jx, tuple) else (jx,)))
        to_jax, to_hf = tr if tr else (None, None)
        rows.append(Row(hfk, jxk, to_jax, to_hf, when or (lambda cfg: True), per_layer=True))
    return rows


def megatron_layer_rows(hf_prefix, qkv):
    """The per-layer rows that GLM and ChatGLM-6B share (Megatron naming, biases everywhere, GELU MLP); only the
    fused-qkv row layout differs, passed as `qkv` = ((w_to_jax, w_to_hf), (b_to_jax, b_to_hf))."""
    (w, b) = qkv
    return layer_rows(hf_prefix, "layers_{l}/block/", [
        ("input_layernorm.weight", "input_norm/scale", None, None),
        ("input_layernorm.bias", "input_norm/bias", None, None),
        ("attention.query_key_value.weight", ("attn/q/kernel", "attn/k/kernel", "attn/v/kernel"), w, None),
        ("attention.query_key_value.bias", ("attn/q/bias", "attn/k/bias", "attn/v/bias"), b, None),
        ("attention.dense.weight", "attn/o/kernel", linear(NH, D), None),
        ("attention.dense.bias", "attn/o/bias", None, None),
        ("post_attention_layernorm.weight", "mlp_norm/scale", None, None),
        ("post_attention_layernorm.bias", "mlp_norm/bias", None, None),
        ("mlp.dense_h_to_4h.weight", "mlp/up/kernel", linear(D, F), None),
        ("mlp.dense_h_to_4h.bias", "mlp/up/bias", None, None),
        ("mlp.dense_4h_to_h.weight", "mlp/down/kernel", linear(F, D), None),
        ("mlp.dense_4h_to_h.bias", "mlp/down/bias", None, None),
    ])
