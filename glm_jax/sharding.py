"""Logical-axis sharding: the one table that maps the model's logical axis names onto the mesh.

Model code names only logical axes (`embed`, `q_heads`, `activation_batch`, ...). `RULES` maps them onto the
mesh axes ('data', 'fsdp', 'context', 'tensor'); changing a parallelism strategy means editing this table.
'context' splits the sequence (activation_length) and, like 'fsdp', shards the params' embed dim, so that a context
shard holds no whole copy of the weights (as MaxText's context axis does). 'expert' shards the routed experts
(`exp`) and, outside the MoE layers, acts as one more data-parallel axis of the batch (as MaxText's expert axis).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from glm_jax.model.transformer import param_axes

MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")

RULES = (
    # params
    ("vocab", "tensor"),
    ("embed", ("fsdp", "context")),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
    ("exp", "expert"),
    ("positions", None),
    ("prefix", None),
    ("prefix_embed", None),
    # activations
    ("activation_batch", ("data", "fsdp", "expert")),
    ("activation_length", "context"),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("cache_batch", ("data", "fsdp", "expert")),
    ("cache_length", None),
)


def make_mesh(
    data: int = 1,
    fsdp: int = 1,
    tensor: int = 1,
    devices: Sequence | None = None,
    *,
    context: int = 1,
    expert: int = 1,
) -> jax.sharding.Mesh:
    """A ('data', 'fsdp', 'expert', 'context', 'tensor') mesh over the first data*fsdp*expert*context*tensor
    devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = (data, fsdp, expert, context, tensor)
    n = math.prod(shape)
    if n > len(devices):
        raise ValueError(f"mesh {'x'.join(map(str, shape))} needs {n} devices, only {len(devices)} available")
    arr = np.asarray(devices[:n], dtype=object).reshape(shape)
    return jax.sharding.Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _mesh_size(mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def shards_along(name: str, dim: int, mesh, rules=RULES) -> int:
    """How many pieces the rules cut an array dim with logical name `name` (size `dim`) into on `mesh`."""
    return _mesh_size(mesh, logical_to_spec((name,), (dim,), mesh, rules)[0])


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh, rules=RULES) -> P:
    """PartitionSpec for one array; a mesh axis is dropped where it does not divide the dimension or is used twice."""
    table = dict(rules)
    used, out = set(), []
    for name, dim in zip(names, shape):
        axes = table.get(name) if name is not None else None
        if axes is not None:
            tup = (axes,) if isinstance(axes, str) else tuple(axes)
            tup = tuple(a for a in tup if a not in used and mesh.shape.get(a, 1) > 1)
            if not tup or dim % _mesh_size(mesh, tup):
                axes = None
            else:
                used.update(tup)
                axes = tup[0] if len(tup) == 1 else tup
        out.append(axes)
    return P(*out)


def tree_shardings(axes_tree, shapes_tree, mesh, rules=RULES):
    """NamedShardings for a tree, from its logical names and shapes."""
    return jax.tree.map(
        lambda names, s: NamedSharding(mesh, logical_to_spec(names, s.shape, mesh, rules)),
        axes_tree,
        shapes_tree,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def shard_params(params, cfg, mesh, rules=RULES):
    """Place a params tree on the mesh according to the rules table."""
    shardings = tree_shardings(param_axes(cfg), params, mesh, rules)
    return jax.tree.map(jax.device_put, params, shardings)


def axis_rules(rules=RULES):
    """Context manager that makes nn.with_logical_constraint use the rules table."""
    return nn.logical_axis_rules(rules)
