"""Blockwise (FlashAttention-2 style) attention in Pallas, forward and backward, with GLM's attention masks.

Shape suffixes: B batch, T query length, S key length, N query heads, K kv heads (N a multiple of K; query head n
reads kv head n // (N/K)), H head dim. Inside the kernels, lowercase q and k suffixes are one q block's rows
(block_q) and one kv block's rows (block_k), h the head dim: s_qk is a [block_q, block_k] tile of scores.

Mask rule: key s is visible to query t iff all of
  * causal is False, or s <= q_offset + t, or s < prefix_len[b]  (GLM's Part A is bidirectional; ChatGLM-6B's
    "context up to <sop>" is the same rule with prefix_len = index of <sop>). Query t sits at position q_offset + t of
    the key sequence (0 and T == S for self-attention; a context-parallel shard passes its chunk's offset),
  * q_segment_ids[b, t] == kv_segment_ids[b, s] (packed documents) and kv_valid[b, s] (padding), when given.
Scores and softmax statistics are float32, scale 1/sqrt(H). A row with no visible key gets what `attention.attend`
gives with its -1e30 fill: the mean of v over all S keys (fixed up outside the kernel from the row's logsumexp).

Why this kernel exists: jax's own Pallas TPU kernels (ops/tpu/flash_attention, splash_attention) cover causal and
segment ids, but splash attention's masks are static per kernel and a per-example prefix_len is data (so is a context
shard's query offset, which depends on the device's place on the mesh). Here prefix_len and the query offset are
scalar-prefetched, and kv blocks the causal/prefix rule hides from a whole q block are skipped with pl.when (and not
fetched: the index_map repeats a block fetched anyway). Blocks hidden only by segment ids or padding are computed and
masked (segment-based skipping would need per-block id ranges; not done).

Layout: q/k/v are transposed to [B, N|K, T|S, H] and padded to a multiple of the block sizes (padded keys masked as
invalid, padded queries sliced off); blocks of 128 rows suit TPU Mosaic. Both passes compile for TPU topologies via
AOT on a CPU host (never run on a TPU here); off TPU they run with interpret=True (Mosaic-style, not Triton, kernels).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from glm_jax.model.context import target_platform
from glm_jax.model.flash_blocks import block_sizes, block_visible, kv_fetch, q_fetch, round_up, visible_blocks

__all__ = ["NEG", "flash_attention", "visible_blocks"]

NEG = -1e30  # same finite fill as attention.attend: a row with no visible key has every score == NEG
NT = (((1,), (1,)), ((), ()))  # dot_general dims: a [m, d] . b [n, d] -> [m, n]
TN = (((0,), (0,)), ((), ()))  # a [d, m] . b [d, n] -> [m, n]


class _Cfg(NamedTuple):
    causal: bool
    bq: int
    bk: int
    nq: int
    nk: int
    groups: int  # G = N // K
    interpret: bool


def _scores(cfg, qi, ki, prefix, qoff, q_ref, k_ref, qseg_ref, kseg_ref, valid_ref):
    """Scaled float32 scores [bq, bk] of one block pair and its visibility mask."""
    q, k = q_ref[...], k_ref[...]
    s_qk = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32) * (1.0 / float(q.shape[-1]) ** 0.5)
    mask_qk = (valid_ref[...] != 0) & (qseg_ref[...] == kseg_ref[...])  # [1, bk] & ([bq, 1] == [1, bk])
    if cfg.causal:
        rows = qoff + qi * cfg.bq + lax.broadcasted_iota(jnp.int32, s_qk.shape, 0)
        cols = ki * cfg.bk + lax.broadcasted_iota(jnp.int32, s_qk.shape, 1)
        mask_qk = mask_qk & ((cols <= rows) | (cols < prefix))
    return s_qk, mask_qk


def _visible(cfg, qi, ki, prefix, qoff):
    return block_visible(qi, ki, prefix, causal=cfg.causal, block_q=cfg.bq, block_k=cfg.bk, q_offset=qoff)


def _scalars(scal_ref, b):
    """(prefix_len[b], q_offset) from the scalar-prefetched [1 + B] int32 array (q_offset first)."""
    return scal_ref[1 + b], scal_ref[0]


# ---------------------------------------------------------------- kernels (refs: one block each, batch/head squeezed)


def _fwd_kernel(
    scal_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, valid_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr, *, cfg
):
    b, qi, ki = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    prefix, qoff = _scalars(scal_ref, b)

    @pl.when(ki == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, NEG, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(_visible(cfg, qi, ki, prefix, qoff))
    def _step():
        s_qk, mask_qk = _scores(cfg, qi, ki, prefix, qoff, q_ref, k_ref, qseg_ref, kseg_ref, valid_ref)
        s_qk = jnp.where(mask_qk, s_qk, NEG)
        m_prev = m_scr[...]
        m_new = jnp.maximum(m_prev, jnp.max(s_qk, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p_qk = jnp.exp(s_qk - m_new)
        l_scr[...] = alpha * l_scr[...] + jnp.sum(p_qk, axis=1, keepdims=True)
        pv_qh = jnp.dot(p_qk.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)
        acc_scr[...] = alpha * acc_scr[...] + pv_qh
        m_scr[...] = m_new

    @pl.when(ki == cfg.nk - 1)
    def _store():  # l >= 1: kv block 0 is always visited and its row max contributes exp(0)
        o_ref[...] = (acc_scr[...] / l_scr[...]).astype(o_ref.dtype)
        lse_ref[...] = m_scr[...] + jnp.log(l_scr[...])


def _probs(cfg, qi, ki, prefix, qoff, q_ref, k_ref, qseg_ref, kseg_ref, valid_ref, lse_ref):
    """P of one block pair recomputed from the saved logsumexp; exactly 0 where masked (also in no-key rows)."""
    s_qk, mask_qk = _scores(cfg, qi, ki, prefix, qoff, q_ref, k_ref, qseg_ref, kseg_ref, valid_ref)
    return jnp.where(mask_qk, jnp.exp(s_qk - lse_ref[...]), 0.0)


def _dq_kernel(
    scal_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, valid_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_scr, *, cfg
):
    b, qi, ki = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    prefix, qoff = _scalars(scal_ref, b)

    @pl.when(ki == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    @pl.when(_visible(cfg, qi, ki, prefix, qoff))
    def _step():
        p_qk = _probs(cfg, qi, ki, prefix, qoff, q_ref, k_ref, qseg_ref, kseg_ref, valid_ref, lse_ref)
        dp_qk = lax.dot_general(do_ref[...], v_ref[...], NT, preferred_element_type=jnp.float32)
        ds_qk = p_qk * (dp_qk - delta_ref[...])
        dq_scr[...] += jnp.dot(ds_qk.astype(k_ref.dtype), k_ref[...], preferred_element_type=jnp.float32)

    @pl.when(ki == cfg.nk - 1)
    def _store():
        dq_ref[...] = (dq_scr[...] * (1.0 / float(q_ref.shape[-1]) ** 0.5)).astype(dq_ref.dtype)


def _dkv_kernel(
    scal_ref,
    q_ref,
    k_ref,
    v_ref,
    qseg_ref,
    kseg_ref,
    valid_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    dk_scr,
    dv_scr,
    *,
    cfg,
):
    """Grid (B, K, nk, G·nq): the last axis walks the G query heads of kv head k and their q blocks."""
    b, ki, r = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    qi = lax.rem(r, cfg.nq)
    prefix, qoff = _scalars(scal_ref, b)

    @pl.when(r == 0)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    @pl.when(_visible(cfg, qi, ki, prefix, qoff))
    def _step():
        p_qk = _probs(cfg, qi, ki, prefix, qoff, q_ref, k_ref, qseg_ref, kseg_ref, valid_ref, lse_ref)
        dv_scr[...] += lax.dot_general(p_qk.astype(do_ref.dtype), do_ref[...], TN, preferred_element_type=jnp.float32)
        dp_qk = lax.dot_general(do_ref[...], v_ref[...], NT, preferred_element_type=jnp.float32)
        ds_qk = p_qk * (dp_qk - delta_ref[...])
        dk_scr[...] += lax.dot_general(ds_qk.astype(q_ref.dtype), q_ref[...], TN, preferred_element_type=jnp.float32)

    @pl.when(r == cfg.groups * cfg.nq - 1)
    def _store():
        dk_ref[...] = (dk_scr[...] * (1.0 / float(q_ref.shape[-1]) ** 0.5)).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


# ---------------------------------------------------------------- pallas_call wrappers


def _call(kernel, cfg, grid, in_specs, out_specs, out_shape, scratch, args):
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=grid, in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
    )(*args)


def _q_major_specs(cfg, H):
    """BlockSpecs for grid (B, N, nq, nk): q-side blocks follow (n, qi), kv-side blocks (n // G, ki)."""

    def q_map(b, n, qi, ki, scal_ref):
        return b, n, qi, 0

    def kv_map(b, n, qi, ki, scal_ref):
        return b, lax.div(n, cfg.groups), kv_fetch(cfg, qi, ki, *_scalars(scal_ref, b)), 0

    def qrow_map(b, n, qi, ki, scal_ref):
        return b, qi, 0

    def krow_map(b, n, qi, ki, scal_ref):
        return b, 0, kv_fetch(cfg, qi, ki, *_scalars(scal_ref, b))

    q_spec = pl.BlockSpec((None, None, cfg.bq, H), q_map)
    kv_spec = pl.BlockSpec((None, None, cfg.bk, H), kv_map)
    qrow_spec = pl.BlockSpec((None, cfg.bq, 1), qrow_map)
    krow_spec = pl.BlockSpec((None, 1, cfg.bk), krow_map)
    col_spec = pl.BlockSpec((None, None, cfg.bq, 1), q_map)
    return q_spec, kv_spec, qrow_spec, krow_spec, col_spec


def _forward(cfg, q_BNTH, k_BKSH, v_BKSH, scalars, qseg_BT1, kseg_B1S, valid_B1S):
    B, N, Tp, H = q_BNTH.shape
    q_spec, kv_spec, qrow_spec, krow_spec, col_spec = _q_major_specs(cfg, H)
    return _call(
        _fwd_kernel,
        cfg,
        (B, N, cfg.nq, cfg.nk),
        [q_spec, kv_spec, kv_spec, qrow_spec, krow_spec, krow_spec],
        [q_spec, col_spec],
        [jax.ShapeDtypeStruct(q_BNTH.shape, q_BNTH.dtype), jax.ShapeDtypeStruct((B, N, Tp, 1), jnp.float32)],
        [
            pltpu.VMEM((cfg.bq, 1), jnp.float32),
            pltpu.VMEM((cfg.bq, 1), jnp.float32),
            pltpu.VMEM((cfg.bq, H), jnp.float32),
        ],
        (scalars, q_BNTH, k_BKSH, v_BKSH, qseg_BT1, kseg_B1S, valid_B1S),
    )


def _backward_dq(cfg, res, do_BNTH, delta_BNT1):
    q_BNTH, k_BKSH, v_BKSH, scalars, qseg_BT1, kseg_B1S, valid_B1S, lse_BNT1 = res
    B, N, _, H = q_BNTH.shape
    q_spec, kv_spec, qrow_spec, krow_spec, col_spec = _q_major_specs(cfg, H)
    return _call(
        _dq_kernel,
        cfg,
        (B, N, cfg.nq, cfg.nk),
        [q_spec, kv_spec, kv_spec, qrow_spec, krow_spec, krow_spec, q_spec, col_spec, col_spec],
        q_spec,
        jax.ShapeDtypeStruct(q_BNTH.shape, q_BNTH.dtype),
        [pltpu.VMEM((cfg.bq, H), jnp.float32)],
        (scalars, q_BNTH, k_BKSH, v_BKSH, qseg_BT1, kseg_B1S, valid_B1S, do_BNTH, lse_BNT1, delta_BNT1),
    )


def _backward_dkv(cfg, res, do_BNTH, delta_BNT1):
    q_BNTH, k_BKSH, v_BKSH, scalars, qseg_BT1, kseg_B1S, valid_B1S, lse_BNT1 = res
    B, K, _, H = k_BKSH.shape

    def q_map(b, kh, ki, r, scal_ref):
        qb = q_fetch(cfg, lax.rem(r, cfg.nq), ki, *_scalars(scal_ref, b))
        return b, kh * cfg.groups + lax.div(r, cfg.nq), qb, 0

    def kv_map(b, kh, ki, r, scal_ref):
        return b, kh, ki, 0

    def qrow_map(b, kh, ki, r, scal_ref):
        return b, q_fetch(cfg, lax.rem(r, cfg.nq), ki, *_scalars(scal_ref, b)), 0

    def krow_map(b, kh, ki, r, scal_ref):
        return b, 0, ki

    q_spec = pl.BlockSpec((None, None, cfg.bq, H), q_map)
    kv_spec = pl.BlockSpec((None, None, cfg.bk, H), kv_map)
    col_spec = pl.BlockSpec((None, None, cfg.bq, 1), q_map)
    krow_spec = pl.BlockSpec((None, 1, cfg.bk), krow_map)
    return _call(
        _dkv_kernel,
        cfg,
        (B, K, cfg.nk, cfg.groups * cfg.nq),
        [
            q_spec,
            kv_spec,
            kv_spec,
            pl.BlockSpec((None, cfg.bq, 1), qrow_map),
            krow_spec,
            krow_spec,
            q_spec,
            col_spec,
            col_spec,
        ],
        [kv_spec, kv_spec],
        [jax.ShapeDtypeStruct(k_BKSH.shape, k_BKSH.dtype), jax.ShapeDtypeStruct(v_BKSH.shape, v_BKSH.dtype)],
        [pltpu.VMEM((cfg.bk, H), jnp.float32), pltpu.VMEM((cfg.bk, H), jnp.float32)],
        (scalars, q_BNTH, k_BKSH, v_BKSH, qseg_BT1, kseg_B1S, valid_B1S, do_BNTH, lse_BNT1, delta_BNT1),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q_BNTH, k_BKSH, v_BKSH, masks):
    """(o [B, N, Tp, H], logsumexp [B, N, Tp, 1]) on padded, head-major inputs; masks = (prefix, segs, valid)."""
    return _forward(cfg, q_BNTH, k_BKSH, v_BKSH, *masks)


def _flash_fwd(cfg, q_BNTH, k_BKSH, v_BKSH, masks):
    o_BNTH, lse_BNT1 = _forward(cfg, q_BNTH, k_BKSH, v_BKSH, *masks)
    return (o_BNTH, lse_BNT1), (q_BNTH, k_BKSH, v_BKSH, *masks, lse_BNT1, o_BNTH)


def _flash_bwd(cfg, saved, cts):
    res, o_BNTH = saved[:-1], saved[-1]
    do_BNTH = cts[0]  # the logsumexp only feeds a comparison outside: its cotangent is zero
    delta_BNT1 = jnp.sum(do_BNTH.astype(jnp.float32) * o_BNTH.astype(jnp.float32), axis=-1, keepdims=True)
    dq_BNTH = _backward_dq(cfg, res, do_BNTH, delta_BNT1)
    dk_BKSH, dv_BKSH = _backward_dkv(cfg, res, do_BNTH, delta_BNT1)
    return dq_BNTH, dk_BKSH, dv_BKSH, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_axis(x, axis, size, value=0):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def flash_attention(
    q_BTNH,
    k_BSKH,
    v_BSKH,
    *,
    q_segment_ids=None,
    kv_segment_ids=None,
    prefix_len=None,
    kv_valid=None,
    q_offset=0,
    causal=True,
    block_q=128,
    block_k=128,
    interpret=None,
):
    """softmax(q·kᵀ/sqrt(H), masked by the module's rule) · v -> [B, T, N, H] in q's dtype. prefix_len: [B] int (None =
    0); segment ids: [B, T] / [B, S] ints (both or neither); kv_valid: [B, S] bool/int. q_offset: int scalar (may be
    traced), the key position of query 0: queries are keys q_offset .. q_offset + T - 1 (a context-parallel shard's
    chunk of the full key sequence). Differentiable in q, k, v."""
    B, T, N = q_BTNH.shape[:3]
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    if N % K:
        raise ValueError(f"query heads {N} are not a multiple of kv heads {K}")
    if causal and isinstance(q_offset, int) and q_offset + T > S:
        raise ValueError(f"causal/prefix masking: queries at {q_offset}..{q_offset + T - 1} lie past the S={S} keys")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
    interpret = target_platform() != "tpu" if interpret is None else interpret
    bq, bk = block_sizes(T, S, block_q, block_k)
    Tp, Sp = round_up(T, bq), round_up(S, bk)
    cfg = _Cfg(bool(causal), bq, bk, Tp // bq, Sp // bk, N // K, bool(interpret))

    prefix_B = jnp.broadcast_to(jnp.asarray(0 if prefix_len is None else prefix_len, jnp.int32), (B,))
    scalars = jnp.concatenate([jnp.asarray(q_offset, jnp.int32).reshape(1), prefix_B])  # see _scalars
    if q_segment_ids is None:  # segment ids always travel (all 0): one compare per score, one kernel variant
        q_segment_ids, kv_segment_ids = jnp.zeros((B, T), jnp.int32), jnp.zeros((B, S), jnp.int32)
    valid_BS = jnp.ones((B, S), jnp.int32) if kv_valid is None else jnp.asarray(kv_valid).astype(jnp.int32)
    qseg_BT1 = _pad_axis(jnp.asarray(q_segment_ids, jnp.int32), 1, Tp)[:, :, None]
    kseg_B1S = _pad_axis(jnp.asarray(kv_segment_ids, jnp.int32), 1, Sp)[:, None, :]
    valid_B1S = _pad_axis(valid_BS, 1, Sp)[:, None, :]  # padded keys are invalid
    q_BNTH = _pad_axis(q_BTNH.transpose(0, 2, 1, 3), 2, Tp)
    k_BKSH = _pad_axis(k_BSKH.transpose(0, 2, 1, 3), 2, Sp)
    v_BKSH = _pad_axis(v_BSKH.astype(k_BSKH.dtype).transpose(0, 2, 1, 3), 2, Sp)

    o_BNTH, lse_BNT1 = _flash(cfg, q_BNTH, k_BKSH, v_BKSH, (scalars, qseg_BT1, kseg_B1S, valid_B1S))
    o_BTNH = o_BNTH[:, :, :T].transpose(0, 2, 1, 3)
    # Rows with no visible key: every score was NEG, so lse = NEG + log(count). The reference's softmax over an
    # all-NEG row is uniform over all S keys: substitute mean(v) (autodiff gives dv += dO/S, dq = dk = 0 there).
    dead_BTN = (lse_BNT1[:, :, :T, 0] < NEG / 2).transpose(0, 2, 1)
    vmean_BKH = jnp.mean(v_BSKH.astype(jnp.float32), axis=1)
    vmean_BNH = jnp.repeat(vmean_BKH, N // K, axis=1)  # [B, K, H] -> [B, N, H]: a mean per head, not k/v
    return jnp.where(dead_BTN[..., None], vmean_BNH[:, None].astype(q_BTNH.dtype), o_BTNH).astype(q_BTNH.dtype)
