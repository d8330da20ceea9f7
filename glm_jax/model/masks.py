"""Default attention masks and position ids, built by each family's own rules (GLMConfig.mask_rule and
position_rule).

Everything here is jit-able jnp code on [B, T] token ids. `allowed_BTS` is True where a query may attend a key.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def _first_index(hit_BT, default):
    """Index of the first True per row, or `default` ([B] or scalar) where there is none."""
    idx = jnp.argmax(hit_BT, axis=1)
    return jnp.where(jnp.any(hit_BT, axis=1), idx, jnp.broadcast_to(default, idx.shape)).astype(jnp.int32)


def _is_any(ids, token_ids):
    hit = jnp.zeros(ids.shape, bool)
    for t in token_ids:
        if t is not None:
            hit = hit | (ids == t)
    return hit


def _glm_mask_ids(cfg):
    return [t for t in (cfg.mask_token_id, cfg.smask_token_id, cfg.gmask_token_id) if t is not None]


def context_length(cfg, input_ids, prefix_len):
    """Length of the bidirectional part: prefix_len if given, else the family's rule, else 0."""
    B, T = input_ids.shape
    if prefix_len is not None:
        return jnp.broadcast_to(jnp.asarray(prefix_len, jnp.int32), (B,))
    if cfg.mask_rule == "prefix_until_sop" and cfg.bos_token_id is not None:
        return _first_index(input_ids == cfg.bos_token_id, T)
    if cfg.mask_rule == "sep_at_sop" and cfg.bos_token_id is not None:
        return _first_index(input_ids == cfg.bos_token_id, 0)
    return jnp.zeros((B,), jnp.int32)


class MaskSpec(NamedTuple):
    """A default mask in the form the blockwise kernel takes it, never materialised as [B, T, T]: key s is visible
    to query t iff (s <= t or s < prefix_len[b]) and kv_valid[b, s] and segment_ids[b, s] == segment_ids[b, t]."""

    prefix_len: jax.Array  # [B] int32: keys before it are visible to every query (T: fully bidirectional)
    kv_valid: jax.Array | None  # [B, T] bool padding mask
    segment_ids: jax.Array | None  # [B, T] packed-document ids


def mask_spec(cfg, input_ids, attention_mask=None, prefix_len=None, segment_ids=None) -> MaskSpec:
    """The family's default mask (no dense mask given): causal after the bidirectional context, padding, segments."""
    B, T = input_ids.shape
    if cfg.mask_rule == "sep_at_sop" and prefix_len is None and attention_mask is not None:
        sep = jnp.full((B,), T, jnp.int32)  # HF GLM: a 2-D mask is a pure key-padding mask
    else:
        sep = context_length(cfg, input_ids, prefix_len)
    valid = None if attention_mask is None else attention_mask.astype(bool)
    return MaskSpec(sep, valid, segment_ids)


def dense_mask(spec: MaskSpec, T: int):
    """allowed_BTS of a MaskSpec."""
    q = jnp.arange(T)[:, None]
    k = jnp.arange(T)[None, :]
    allowed = (k[None] < spec.prefix_len[:, None, None]) | (k <= q)[None]
    if spec.kv_valid is not None:
        allowed = allowed & spec.kv_valid[:, None, :]
    if spec.segment_ids is not None:
        allowed = allowed & (spec.segment_ids[:, :, None] == spec.segment_ids[:, None, :])
    return allowed


def default_allowed(cfg, input_ids, attention_mask=None, prefix_len=None, segment_ids=None):
    """allowed_BTS: a dense [B, T, T] / [B, 1, T, T] attention_mask as given, else the family's rule."""
    B, T = input_ids.shape
    if attention_mask is not None and attention_mask.ndim >= 3:
        m = attention_mask.reshape(B, T, -1) if attention_mask.ndim == 4 else attention_mask
        allowed = m.astype(bool)
        if segment_ids is not None:
            allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
        return allowed
    return dense_mask(mask_spec(cfg, input_ids, attention_mask, prefix_len, segment_ids), T)


def default_positions(cfg, input_ids, attention_mask=None, prefix_len=None):
    """Position ids by the config's `position_rule`: [B, T], or [B, 2, T] (position and block position) for the
    2-D rules. With a [B, T] padding mask the real tokens count from 0 and padding sits at 0."""
    B, T = input_ids.shape
    pad = attention_mask is not None and attention_mask.ndim == 2
    real = attention_mask.astype(bool) if pad else jnp.ones((B, T), bool)
    return _POSITION_RULES[cfg.position_rule](cfg, input_ids, real, prefix_len)


def _sequential(cfg, input_ids, real, prefix_len):
    return jnp.where(real, jnp.cumsum(real, axis=1) - 1, 0).astype(jnp.int32)


def _at_mask(cfg, input_ids, real, prefix_len):
    """ChatGLM-6B: Part A counts up; Part B sits at the mask ([gMASK] first). 2-D: block positions count Part B;
    1-D: only a [MASK] context (no [gMASK]) pins Part B to the mask, else Part B counts on."""
    B, T = input_ids.shape
    t = jnp.arange(T, dtype=jnp.int32)[None, :]
    first_real = _first_index(real, 0)[:, None]
    ctx = context_length(cfg, input_ids, prefix_len)[:, None]
    has_g = (
        jnp.any(input_ids == cfg.gmask_token_id, axis=1) if cfg.gmask_token_id is not None else jnp.zeros((B,), bool)
    )
    gpos = _first_index(input_ids == cfg.gmask_token_id, 0) if cfg.gmask_token_id is not None else 0
    mpos = (
        _first_index(input_ids == cfg.mask_token_id, ctx[:, 0] - 1) if cfg.mask_token_id is not None else ctx[:, 0] - 1
    )
    mask_pos = jnp.where(has_g, gpos, mpos)[:, None] - first_real
    if not cfg.positions_2d:
        pos = jnp.where((t >= ctx) & ~has_g[:, None], mask_pos, t - first_real)
        return jnp.where(real, pos, 0).astype(jnp.int32)
    pos = jnp.where(t < ctx, t - first_real, mask_pos)
    block = jnp.where(t < ctx, 0, t - ctx + 1)
    return jnp.stack([jnp.where(real, pos, 0), jnp.where(real, block, 0)], axis=1).astype(jnp.int32)


def _per_span(cfg, input_ids, real, prefix_len):
    """GLM's learned 2-D positions: Part A counts up; the i-th <sop> segment of Part B takes the position of the
    i-th mask, and its block positions count within the segment."""
    B, T = input_ids.shape
    t = jnp.arange(T, dtype=jnp.int32)[None, :]
    first_real = _first_index(real, 0)[:, None]
    mask_ids = _glm_mask_ids(cfg)
    base = jnp.where(real, t - first_real, 0)
    if cfg.bos_token_id is None or not mask_ids:
        return jnp.stack([base, jnp.zeros_like(base)], axis=1).astype(jnp.int32)
    ctx = context_length(cfg, input_ids, prefix_len)[:, None]
    in_b = t >= ctx
    is_sop = (input_ids == cfg.bos_token_id) & in_b
    seg = jnp.cumsum(is_sop, axis=1)  # 1.. within Part B
    is_mask = _is_any(input_ids, mask_ids) & ~in_b
    mask_sorted = jnp.sort(jnp.where(is_mask, t, T), axis=1)  # mask indices in order
    seg_mask = jnp.take_along_axis(mask_sorted, jnp.clip(seg - 1, 0, T - 1), axis=1)
    seg_mask = jnp.where(seg_mask >= T, ctx - 1, seg_mask) - first_real
    start = _cummax(jnp.where(is_sop, t, 0))
    pos = jnp.where(in_b & (seg > 0), seg_mask, base)
    block = jnp.where(in_b & (seg > 0), t - start + 1, 0)
    return jnp.stack([jnp.where(real, pos, 0), jnp.where(real, block, 0)], axis=1).astype(jnp.int32)


# one function per GLMConfig.position_rule value
_POSITION_RULES = {"sequential": _sequential, "at_mask_1d": _at_mask, "at_mask_2d": _at_mask, "per_span_2d": _per_span}


def _cummax(x_BT):
    return jax.lax.cummax(x_BT, axis=1)
