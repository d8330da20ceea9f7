"""Key maps: rows that pair a checkpoint's keys with param paths through an invertible transform.

A family's key map is a list of `Row`s. The same rows drive loading (HF -> params) and export (params -> HF),
so a round trip is exact by construction. Arrays are numpy; HF linears are [out, in], our kernels [in..., out...].
Shape helpers (`D`, `NH`, ...) take the config and give a shape tuple.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from glm_jax.hostbuf import c, copy_2d


def always(cfg) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class Row:
    hf: tuple  # HF key patterns; "{l}" stands for the layer index
    jax: tuple  # param paths, "/"-separated; "{l}" likewise
    to_jax: Callable | None = None  # (cfg, [hf arrays]) -> [param arrays]; default identity
    to_hf: Callable | None = None  # (cfg, [param arrays]) -> [hf arrays]; default identity
    when: Callable = always  # cfg -> whether the row applies to this model
    per_layer: bool = False
    layers: Callable | None = None  # cfg -> the layer indices a per-layer row covers (default all num_layers)

    def load(self, cfg, arrays):
        return list(arrays) if self.to_jax is None else self.to_jax(cfg, arrays)

    def save(self, cfg, arrays):
        return list(arrays) if self.to_hf is None else self.to_hf(cfg, arrays)


def expand(rows, cfg) -> list:
    """The rows that apply to `cfg`, per-layer rows repeated for every layer with "{l}" filled in ("{m}": the
    index past the last layer, for the MTP layers stored after it). An HF key with "{e}" stands for one key per
    routed expert, in expert order (the row stacks them)."""
    out = []
    for r in rows:
        if not r.when(cfg):
            continue
        if r.per_layer:
            for layer in r.layers(cfg) if r.layers else range(cfg.num_layers):
                at = dict(l=layer, m=layer - cfg.num_layers)
                out.append(
                    dataclasses.replace(
                        r,
                        hf=_per_expert(tuple(k.format(**at, e="{e}") for k in r.hf), cfg),
                        jax=tuple(k.format(**at) for k in r.jax),
                        per_layer=False,
                        layers=None,
                    )
                )
        else:
            out.append(r)
    return out


def _per_expert(keys, cfg) -> tuple:
    return tuple(x for k in keys for x in ([k.format(e=e) for e in range(cfg.num_experts)] if "{e}" in k else [k]))


def layer_rows(hf_prefix, jax_prefix, names) -> list:
    """Per-layer rows from (hf_suffix(es), jax_suffix(es), (to_jax, to_hf) or None, when or None) tuples."""
    rows = []
    for hf, jx, tr, when in names:
        hfk = tuple(f"{hf_prefix}{h}" for h in (hf if isinstance(hf, tuple) else (hf,)))
        jxk = tuple(f"{jax_prefix}{j}" for j in (jx if isinstance(jx, tuple) else (jx,)))
        to_jax, to_hf = tr if tr else (None, None)
        rows.append(Row(hfk, jxk, to_jax, to_hf, when or always, per_layer=True))
    return rows


# ---------------------------------------------------------------- shapes
def D(cfg):
    return (cfg.hidden_size,)


def NH(cfg):
    return (cfg.num_heads, cfg.head_dim)


def KH(cfg):
    return (cfg.num_kv_heads, cfg.head_dim)


def F(cfg):
    return (cfg.ffn_size,)


def V(cfg):
    return (cfg.vocab_size,)


# ---------------------------------------------------------------- transforms
def linear(in_shape_fn, out_shape_fn):
    """HF [out, in] weight <-> kernel [in..., out...]."""

    def to_jax(cfg, a):
        (w,) = a
        return [c(w.T).reshape(in_shape_fn(cfg) + out_shape_fn(cfg))]  # transposed as 2-D: the fast path

    def to_hf(cfg, a):
        (k,) = a
        i = int(np.prod(in_shape_fn(cfg)))
        return [c(k.reshape(i, -1).T)]

    to_hf.linear_in = in_shape_fn  # lets a reader build a large one block by block (glm-convert's export)
    return to_jax, to_hf


def reshape_bias(shape_fn):
    """HF flat bias [out] <-> bias [out...]."""

    def to_jax(cfg, a):
        return [np.ascontiguousarray(a[0].reshape(shape_fn(cfg)))]

    def to_hf(cfg, a):
        return [np.ascontiguousarray(a[0].reshape(-1))]

    return to_jax, to_hf


def qkv_bias(cfg) -> bool:
    return cfg.qkv_bias


# transformers' Llama-style attention block with separate q/k/v/o projections (GLM-4-0414's Glm4, Glm4Moe): the
# input norm and the projections; each family appends its own norms after them
HF_ATTENTION = [
    ("input_layernorm.weight", "input_norm/scale", None, None),
    ("self_attn.q_proj.weight", "attn/q/kernel", linear(D, NH), None),
    ("self_attn.q_proj.bias", "attn/q/bias", reshape_bias(NH), qkv_bias),
    ("self_attn.k_proj.weight", "attn/k/kernel", linear(D, KH), None),
    ("self_attn.k_proj.bias", "attn/k/bias", reshape_bias(KH), qkv_bias),
    ("self_attn.v_proj.weight", "attn/v/kernel", linear(D, KH), None),
    ("self_attn.v_proj.bias", "attn/v/bias", reshape_bias(KH), qkv_bias),
    ("self_attn.o_proj.weight", "attn/o/kernel", linear(NH, D), None),
]


def qkv_blocks():
    """Fused [Q (all heads) | K (all groups) | V (all groups)] rows <-> q, k, v kernels (or biases)."""

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
    """ChatGLM-6B: rows grouped per head as [q_h | k_h | v_h] <-> q, k, v kernels (or biases)."""

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
    """Fused [gate | up] rows of the SwiGLU input projection <-> gate, up kernels."""

    def to_jax(cfg, a):
        g, u = np.split(a[0], 2, axis=0)
        return [c(g.T), c(u.T)]

    def to_hf(cfg, a):
        g, u = (np.asarray(x) for x in a)
        out = np.empty((g.shape[1] + u.shape[1], g.shape[0]), g.dtype)
        copy_2d(out[: g.shape[1]], g.T)
        copy_2d(out[g.shape[1] :], u.T)
        return [out]

    return to_jax, to_hf


def split_halves():
    """A fused [gate | up] bias <-> gate, up biases."""

    def to_jax(cfg, a):
        g, u = np.split(a[0], 2)
        return [np.ascontiguousarray(g), np.ascontiguousarray(u)]

    def to_hf(cfg, a):
        return [np.concatenate(a)]

    return to_jax, to_hf


def megatron_layer_rows(hf_prefix, qkv) -> list:
    """The per-layer rows that GLM and ChatGLM-6B share (Megatron naming, biases everywhere, GELU MLP); only the
    fused-qkv row layout differs, passed as `qkv` = ((w_to_jax, w_to_hf), (b_to_jax, b_to_hf))."""
    (w, b) = qkv
    return layer_rows(
        hf_prefix,
        "layers_{l}/block/",
        [
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
        ],
    )


# ---------------------------------------------------------------- P-Tuning v2 prefix encoder (ChatGLM-6B, ChatGLM2/3)
PREFIX = "transformer.prefix_encoder."


def _ptuning(cfg) -> bool:
    return cfg.pre_seq_len > 0


def _projection(cfg) -> bool:
    return cfg.pre_seq_len > 0 and cfg.prefix_projection


def _prefix_embed(cfg):
    return (cfg.prefix_embed_size or cfg.prefix_width,)


def _prefix_hidden(cfg):
    return (cfg.prefix_hidden_size,)


def _prefix_width(cfg):
    return (cfg.prefix_width,)


PREFIX_ROWS = [
    Row((PREFIX + "embedding.weight",), ("prefix_encoder/embedding",), when=_ptuning),
    Row(
        (PREFIX + "trans.0.weight",),
        ("prefix_encoder/trans_0/kernel",),
        *linear(_prefix_embed, _prefix_hidden),
        when=_projection,
    ),
    Row((PREFIX + "trans.0.bias",), ("prefix_encoder/trans_0/bias",), when=_projection),
    Row(
        (PREFIX + "trans.2.weight",),
        ("prefix_encoder/trans_2/kernel",),
        *linear(_prefix_hidden, _prefix_width),
        when=_projection,
    ),
    Row((PREFIX + "trans.2.bias",), ("prefix_encoder/trans_2/bias",), when=_projection),
]


def untied(cfg) -> bool:
    return not cfg.tie_word_embeddings
