"""Orbax checkpoints of a training run: `<output_dir>/checkpoints/<step>/{params,opt_state,meta}`.

Contract with glm-convert: `params` is an ocp.args.StandardSave of the params pytree in the model's layout
(stacked under `layers` when scan_layers), `meta` an ocp.args.JsonSave with at least
{"step", "config": GLMConfig.to_dict(), "data_state"}. `opt_state` is saved as a flat dict of its leaves
("000", "001", ...) so that any optax state structure round-trips; the tree structure comes from the
optimizer at restore time. Saves are asynchronous (device→host copies finish before save() returns, so the
donated train state may be reused right away) and only the newest `keep` steps are kept.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp


def _flat(tree) -> dict:
    return {f"{i:04d}": x for i, x in enumerate(jax.tree.leaves(tree))}


class Checkpointer:
    def __init__(self, output_dir, keep: int, async_save: bool = True):
        self.directory = pathlib.Path(output_dir).absolute() / "checkpoints"
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=opts, item_names=("params", "opt_state", "meta"))
        self.last_saved = None

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> bool:
        """Queues a save of `state` at loop step `step` (no-op if that step is already saved)."""
        if step == self.last_saved or step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            opt_state=ocp.args.StandardSave(_flat({"step": state["step"], "opt": state["opt_state"]})),
            meta=ocp.args.JsonSave(meta),
        )
        self.manager.save(step, args=args, force=True)
        self.last_saved = step
        return True

    def restore(self, step: int, abstract_state):
        """(state, meta) with every array placed by the shardings carried in `abstract_state`."""
        opt_abstract = {"step": abstract_state["step"], "opt": abstract_state["opt_state"]}
        leaves, treedef = jax.tree.flatten(opt_abstract)
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state["params"]),
            opt_state=ocp.args.StandardRestore(_flat(opt_abstract)),
            meta=ocp.args.JsonRestore(),
        )
        out = self.manager.restore(step, args=args)
        flat = out["opt_state"]
        opt = jax.tree.unflatten(treedef, [flat[f"{i:04d}"] for i in range(len(leaves))])
        state = {"step": opt["step"], "params": out["params"], "opt_state": opt["opt"]}
        return state, out["meta"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def gather_json(obj) -> list:
    """Every process's JSON-able `obj`, in process order (one entry on a single process)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    n = int(np.max(multihost_utils.process_allgather(np.array([raw.size], np.int32))))
    buf = np.zeros(n, np.uint8)
    buf[: raw.size] = raw
    allb = np.asarray(multihost_utils.process_allgather(buf)).reshape(jax.process_count(), n)
    return [json.loads(bytes(row).rstrip(b"\0").decode()) for row in allb]
