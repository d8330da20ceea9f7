"""Grouped matmul for the routed experts: `jax.lax.ragged_dot`'s product, with a tiled form for XLA:CPU.

grouped_matmul(a [M, K], w [G, K, N], sizes [G]) -> [M, N]: rows are in G contiguous groups (group g holds the next
sizes[g] rows) and row m of group g is a[m] @ w[g]; rows past sum(sizes) give 0. This is ragged_dot's definition.

Why a second form: XLA:CPU lowers ragged_dot as G dense products over all M rows, each masked to its group, so a
layer with 16 experts does 16x the expert work (measured in bench/moe_bench.py). On CPU the product here walks the
row tiles instead, megablox-style: the (row tile, group) pairs that overlap are at most ceil(M / bm) + G, and a
lax.fori_loop multiplies each pair's [bm, K] tile by its group's [K, N] weight, masking the rows of other groups.
The work is the real work plus at most G tiles. Its gradient is a custom_vjp of the same loop: da is the grouped
product of the cotangent with each group's wᵀ, dw[g] sums a_tileᵀ · dy_tile over group g's pairs (the loop carries
dw and updates one group in place a step). TPU and GPU programs keep ragged_dot (the MXU's grouped matmul, and
what an AOT compile for a TPU topology prices); the choice follows glm_jax.model.context.target_platform.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from glm_jax.model.context import target_platform

TILE_ROWS = 128


def grouped_matmul(a_MK, w_GKN, sizes_G, preferred_element_type=None, tiled=None):
    """ragged_dot(a, w, sizes); `tiled` None: the tile loop when the program is built for the CPU."""
    if tiled is None:
        tiled = target_platform() == "cpu"
    if not tiled:
        return lax.ragged_dot(a_MK, w_GKN, sizes_G, preferred_element_type=preferred_element_type)
    out = jnp.result_type(a_MK.dtype, w_GKN.dtype) if preferred_element_type is None else preferred_element_type
    return _tiled(a_MK, w_GKN, sizes_G.astype(jnp.int32), jnp.dtype(out))


def _pairs(sizes_G, M: int, bm: int):
    """(group, tile) of the overlapping (row tile, group) pairs, padded to the static bound ceil(M / bm) + G with
    pairs of group G (no rows), and each group's first row."""
    G = sizes_G.shape[0]
    ends = jnp.cumsum(sizes_G)
    starts = ends - sizes_G
    first = starts // bm
    count = jnp.where(sizes_G > 0, (jnp.maximum(ends, 1) - 1) // bm - first + 1, 0)
    n = -(-M // bm) + G
    group = jnp.repeat(jnp.arange(G, dtype=jnp.int32), count, total_repeat_length=n)
    before = jnp.cumsum(count) - count
    i = jnp.arange(n, dtype=jnp.int32)
    valid = i < jnp.sum(count)
    group = jnp.where(valid, group, G)
    tile = jnp.where(valid, first[jnp.minimum(group, G - 1)] + i - before[jnp.minimum(group, G - 1)], 0)
    return group, tile, starts, ends


def _loop(sizes_G, M: int, bm: int, body, init):
    group, tile, starts, ends = _pairs(sizes_G, M, bm)
    G = sizes_G.shape[0]

    def step(i, carry):
        g = group[i]
        gi = jnp.minimum(g, G - 1)
        rows = tile[i] * bm + jnp.arange(bm)
        mask = (g < G) & (rows >= starts[gi]) & (rows < ends[gi])
        return body(carry, gi, tile[i] * bm, mask[:, None])

    return lax.fori_loop(0, group.shape[0], step, init)


def _forward(a_MK, w_GKN, sizes_G, out_dtype):
    M, K = a_MK.shape
    N = w_GKN.shape[-1]
    bm = min(TILE_ROWS, max(8, M))
    Mp = -(-M // bm) * bm
    a = jnp.pad(a_MK, ((0, Mp - M), (0, 0)))
    acc = jnp.float32 if jnp.issubdtype(out_dtype, jnp.floating) else out_dtype

    def body(y, g, r0, mask):
        x = lax.dynamic_slice_in_dim(a, r0, bm)
        prod = jnp.dot(x, w_GKN[g], preferred_element_type=acc)
        return lax.dynamic_update_slice_in_dim(y, lax.dynamic_slice_in_dim(y, r0, bm) + jnp.where(mask, prod, 0), r0, 0)

    y = _loop(sizes_G, M, bm, body, jnp.zeros((Mp, N), acc))
    return y[:M].astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tiled(a_MK, w_GKN, sizes_G, out_dtype):
    return _forward(a_MK, w_GKN, sizes_G, out_dtype)


def _tiled_fwd(a_MK, w_GKN, sizes_G, out_dtype):
    return _forward(a_MK, w_GKN, sizes_G, out_dtype), (a_MK, w_GKN, sizes_G)


def _tiled_bwd(out_dtype, res, dy_MN):
    a_MK, w_GKN, sizes_G = res
    M, K = a_MK.shape
    da = _forward(dy_MN.astype(w_GKN.dtype), jnp.swapaxes(w_GKN, 1, 2), sizes_G, a_MK.dtype)
    bm = min(TILE_ROWS, max(8, M))
    Mp = -(-M // bm) * bm
    a = jnp.pad(a_MK, ((0, Mp - M), (0, 0)))
    dy = jnp.pad(dy_MN.astype(jnp.float32), ((0, Mp - M), (0, 0)))

    def body(dw, g, r0, mask):
        x = jnp.where(mask, lax.dynamic_slice_in_dim(a, r0, bm), 0).astype(jnp.float32)
        upd = lax.dot_general(x, lax.dynamic_slice_in_dim(dy, r0, bm), (((0,), (0,)), ((), ())))
        return dw.at[g].add(upd)

    dw = _loop(sizes_G, M, bm, body, jnp.zeros(w_GKN.shape, jnp.float32))
    return da, dw.astype(w_GKN.dtype), None


_tiled.defvjp(_tiled_fwd, _tiled_bwd)
