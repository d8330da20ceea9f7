"""Context parallelism: the sequence split over the mesh axes the rules give `activation_length` ('context').

Load balance. A causal (or GLM prefix + causal) mask gives late queries more keys than early ones, so splitting a row
into C contiguous pieces leaves the last device with ~2C-1 times the first one's attention work. As MaxText does
(`context_parallel_load_balance`), the row is cut into 2C chunks and device i holds chunk i and chunk 2C-1-i: every
device gets one early and one late chunk, and the same work. The model permutes its inputs into that "balanced"
order at entry (ids, positions, padding and segment ids: rotary and GLM's 2-D positions follow their tokens) and
back at exit (the last hidden states), so that norms, MLPs and the loss stay local to each device and callers see
the natural order. Attention all-gathers K/V over the context axis (jax's collective under shard_map), puts them
back in natural order and runs the kernel on each of the device's two query chunks at its offset in the row.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax
from jax._src import mesh as mesh_lib


def target_platform() -> str:
    """The platform a program is built for: the devices of the mesh set by jax.set_mesh (a TPU topology in an AOT
    compile on a CPU host), else the default backend. Decides attention="auto" and the kernel's interpret mode."""
    mesh = mesh_lib.get_concrete_mesh()  # what jax.sharding.get_mesh() gives, which refuses inside jit
    return jax.default_backend() if mesh.empty else mesh.devices.flat[0].platform


def mesh_axes(name: str, dim: int, mesh):
    """The mesh axes the active logical rules give a dim named `name`, or None where they do not divide it."""
    axes = nn.logical_to_mesh_axes((name,))
    axes = None if axes is None else axes[0]
    if axes is None or mesh.empty:
        return None
    tup = (axes,) if isinstance(axes, str) else tuple(axes)
    tup = tuple(a for a in tup if a in mesh.shape and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in tup)
    if not tup or dim % size:
        return None
    return tup[0] if len(tup) == 1 else tup


def context_shards(T: int) -> int:
    """How many pieces the active rules and mesh cut the sequence into (1: no context parallelism). A row must
    split into 2 chunks per piece."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axes = nn.logical_to_mesh_axes(("activation_length",))
    axes = None if axes is None else axes[0]
    if axes is None:
        return 1
    tup = (axes,) if isinstance(axes, str) else tuple(axes)
    C = math.prod(mesh.shape.get(a, 1) for a in tup)
    if C > 1 and T % (2 * C):
        raise ValueError(f"context parallelism over {C} devices needs a sequence length divisible by {2 * C}, got {T}")
    return C


def to_balanced(x, C: int, axis: int = 1):
    """Natural order -> balanced order along `axis`: chunk i then chunk 2C-1-i for i = 0..C-1."""
    if C == 1:
        return x
    axis = axis % x.ndim
    T = x.shape[axis]
    xs = x.reshape(x.shape[:axis] + (2, C, T // (2 * C)) + x.shape[axis + 1 :])
    early = lax.index_in_dim(xs, 0, axis, keepdims=False)
    late = lax.rev(lax.index_in_dim(xs, 1, axis, keepdims=False), (axis,))
    return jnp.stack([early, late], axis=axis + 1).reshape(x.shape)


def from_balanced(x, C: int, axis: int = 1):
    """Balanced order -> natural order along `axis` (the inverse of to_balanced)."""
    if C == 1:
        return x
    axis = axis % x.ndim
    T = x.shape[axis]
    xs = x.reshape(x.shape[:axis] + (C, 2, T // (2 * C)) + x.shape[axis + 1 :])
    early = lax.index_in_dim(xs, 0, axis + 1, keepdims=False)
    late = lax.rev(lax.index_in_dim(xs, 1, axis + 1, keepdims=False), (axis,))
    return jnp.concatenate([early, late], axis=axis).reshape(x.shape)


def local_attention(kernel, axis, C: int):
    """The per-device body under shard_map: q/k/v [B, T/C, ., H] and rows [B, T/C] in balanced order. K/V, padding
    and segment ids are all-gathered (tiled) and put back in natural order; the two local query chunks attend at
    their offsets. kernel(q, k, v, q_seg, kv_seg, prefix, kv_valid, q_offset) -> [B, Tq, N, H]."""

    def body(q, k, v, prefix, valid, seg):
        gather = lambda x: from_balanced(lax.all_gather(x, axis, axis=1, tiled=True), C)  # noqa: E731
        k_all, v_all, valid_all, seg_all = gather(k), gather(v), gather(valid), gather(seg)
        c = q.shape[1] // 2
        i = lax.axis_index(axis)
        half = lambda x, j: x[:, j * c : (j + 1) * c]  # noqa: E731
        offsets = (i * c, (2 * C - 1 - i) * c)
        outs = [kernel(half(q, j), k_all, v_all, half(seg, j), seg_all, prefix, valid_all, offsets[j]) for j in (0, 1)]
        return jnp.concatenate(outs, axis=1)

    return body
