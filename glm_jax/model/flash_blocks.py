"""Block visibility of the flash kernels' grid (glm_jax/model/flash.py): which (q block, kv block) pairs the
causal/prefix rule can show, and which block an index_map fetches in place of one it skips (one already resident,
so a skipped step moves no data)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def round_up(x, m):
    return -(-x // m) * m


def block_sizes(T, S, block_q, block_k):
    """Block sizes actually used: no larger than the (8-rounded) sequence."""
    return min(block_q, round_up(T, 8)), min(block_k, round_up(S, 8))


def block_visible(qi, ki, prefix, *, causal, block_q, block_k, q_offset=0):
    """Whether kv block ki may hold a key visible to some query of q block qi by the causal/prefix rule: its first key
    is at or before the block's last query, or inside the prefix. Exact for that rule; the kernels skip the rest."""
    if not causal:
        return jnp.ones(jnp.broadcast_shapes(jnp.shape(qi), jnp.shape(ki), jnp.shape(prefix)), bool)
    k_first = ki * block_k
    return (k_first <= q_offset + qi * block_q + block_q - 1) | (k_first < prefix)


def visible_blocks(T, S, *, prefix_len=None, causal=True, block_q=128, block_k=128, q_offset=0):
    """[B, nq, nk] bool (B = 1 without prefix_len): the (q block, kv block) pairs the kernels compute."""
    bq, bk = block_sizes(T, S, block_q, block_k)
    prefix_B = jnp.zeros((1,), jnp.int32) if prefix_len is None else jnp.asarray(prefix_len, jnp.int32).reshape(-1)
    qi = jnp.arange(round_up(T, bq) // bq)[None, :, None]
    ki = jnp.arange(round_up(S, bk) // bk)[None, None, :]
    return block_visible(qi, ki, prefix_B[:, None, None], causal=causal, block_q=bq, block_k=bk, q_offset=q_offset)


def kv_fetch(cfg, qi, ki, prefix, qoff):
    """kv block to fetch at step ki: ki itself, or for a skipped block the last visible one (already resident).
    lax.div on non-negative ints: jnp's floor division lowers through sign(), which Mosaic lowers only on a TPU."""
    if not cfg.causal:
        return ki
    last = jnp.maximum(lax.div(qoff + qi * cfg.bq + cfg.bq - 1, cfg.bk), lax.div(jnp.maximum(prefix, 1) - 1, cfg.bk))
    return jnp.minimum(ki, last)


def q_fetch(cfg, qi, ki, prefix, qoff):
    """q block to fetch at step qi of the dk/dv kernel: qi, or for a skipped block the first visible one."""
    if not cfg.causal:
        return qi
    first = jnp.where(ki * cfg.bk < prefix, 0, lax.div(jnp.maximum(ki * cfg.bk - qoff, 0), cfg.bq))
    return jnp.minimum(jnp.maximum(qi, first), cfg.nq - 1)
