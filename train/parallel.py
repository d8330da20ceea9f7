"""Processes, mesh and shardings: the train state and batches placed by the logical rules of glm_jax.sharding.

Nothing here names a mesh axis except through `glm_jax.sharding.RULES`: params get their logical names from
`param_axes(cfg)`, optimizer moments take the sharding of the param they belong to, batches use
`activation_batch`.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from glm_jax.sharding import logical_to_spec, make_mesh, tree_shardings
from train.config import DistributedConfig, MeshConfig, TrainConfigError


def init_distributed(dc: DistributedConfig) -> None:
    """jax.distributed.initialize when this is one of several processes.

    Explicit: distributed.coordinator / num_processes / process_id (or JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID). Automatic: a multi-host TPU slice (TPU_WORKER_HOSTNAMES lists several
    hosts) or a cluster that jax recognises (SLURM, ...), via initialize() with no arguments.
    """
    coord = dc.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    nproc = dc.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0") or 0)
    pid = dc.process_id if dc.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1") or -1)
    if dc.local_device_count:
        jax.config.update("jax_num_cpu_devices", dc.local_device_count)
    if coord or nproc > 1:
        if not (coord and nproc > 0 and pid >= 0):
            raise TrainConfigError(
                "a multi-process run needs distributed.coordinator, distributed.num_processes "
                "and distributed.process_id (or the JAX_* environment variables)"
            )
        if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
            jax.config.update("jax_cpu_collectives_implementation", dc.cpu_collectives)
        jax.distributed.initialize(coordinator_address=coord, num_processes=nproc, process_id=pid)
    elif (
        dc.auto_initialize
        or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
        or int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1
    ):
        jax.distributed.initialize()  # jax detects the cluster (Cloud TPU pod slice, GKE, SLURM, ...)


def resolve_mesh_shape(mc: MeshConfig, n_devices: int) -> tuple[int, int, int, int, int]:
    """(data, fsdp, tensor, context, expert): the -1 axis (at most one) takes the devices the others leave."""
    shape = [mc.data, mc.fsdp, mc.tensor, mc.context, mc.expert]
    if -1 in shape:
        rest = int(np.prod([s for s in shape if s != -1]))
        if n_devices % rest:
            raise TrainConfigError(f"mesh {mc}: {n_devices} devices are not divisible by {rest}")
        shape[shape.index(-1)] = n_devices // rest
    if int(np.prod(shape)) > n_devices:
        raise TrainConfigError(f"mesh {mc} needs {int(np.prod(shape))} devices; only {n_devices} are available")
    return tuple(shape)


def build_mesh(mc: MeshConfig, devices=None):
    devices = list(jax.devices() if devices is None else devices)
    d, f, t, c, e = resolve_mesh_shape(mc, len(devices))
    return make_mesh(d, f, t, devices=devices, context=c, expert=e)


def check_context_divisible(seq_len: int, mesh) -> None:
    """Context parallelism cuts each row into 2 x context chunks (an early and a late one per device)."""
    c = mesh.shape.get("context", 1)
    if c > 1 and seq_len % (2 * c):
        raise TrainConfigError(f"seq_len {seq_len} is not divisible by 2 x mesh.context = {2 * c}")


def replicated(mesh):
    return NamedSharding(mesh, P())


def param_shardings(cfg, params_shapes, mesh):
    from glm_jax.quant.load import param_axes  # the model's axes (+ a quantized base's scales)

    return tree_shardings(param_axes(cfg, params_shapes), params_shapes, mesh)


def _path_key(path) -> tuple:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
    return tuple(out)


def like_params_shardings(tree_shapes, params_shapes, p_shardings, mesh):
    """Shardings for a tree whose leaves mirror params (optimizer moments): the sharding of the param whose
    path is a suffix of the leaf's path and whose shape matches; replicated otherwise (counts, scalars)."""
    table = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params_shapes):
        table[_path_key(path)] = (leaf.shape, None)
    for (path, _), sh in zip(jax.tree_util.tree_leaves_with_path(params_shapes), jax.tree.leaves(p_shardings)):
        key = _path_key(path)
        table[key] = (table[key][0], sh)

    def pick(path, leaf):
        key = _path_key(path)
        for i in range(len(key)):
            hit = table.get(key[i:])
            if hit is not None and tuple(hit[0]) == tuple(leaf.shape):
                return hit[1]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, tree_shapes)


def batch_sharding(mesh, ndim: int, shape=None):
    names = ("activation_batch",) + (None,) * (ndim - 1)
    shape = shape or (int(np.prod(list(mesh.shape.values()))),) * ndim
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh))


def batch_shardings(mesh, batch_shapes: dict):
    return {k: batch_sharding(mesh, len(v.shape), v.shape) for k, v in batch_shapes.items()}


def global_batch(local: dict, shardings: dict, global_rows: int):
    """This process's rows → global jax.Arrays (jax.make_array_from_process_local_data)."""
    out = {}
    for k, x in local.items():
        x = np.asarray(x)
        out[k] = jax.make_array_from_process_local_data(shardings[k], x, (global_rows,) + x.shape[1:])
    return out


def check_batch_divisible(batch_size: int, grad_accum: int, mesh) -> None:
    dp = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape.get("expert", 1)
    micro = batch_size // grad_accum
    if micro % dp:
        raise TrainConfigError(
            f"batch_size/grad_accum = {micro} rows per microbatch is not divisible by the "
            f"{dp} data-parallel shards (mesh.data x mesh.fsdp x mesh.expert)"
        )
    if batch_size % jax.process_count():
        raise TrainConfigError(f"batch_size {batch_size} is not divisible by {jax.process_count()} processes")
