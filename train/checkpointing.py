"""Orbax checkpoints of a training run: `<output_dir>/checkpoints/<step>/{params,opt_state,meta,glm_manifest.json}`.

Contract with glm-convert: `params` is an ocp.args.StandardSave of the params pytree in the model's layout
(stacked under `layers` when scan_layers), `meta` an ocp.args.JsonSave with at least
{"step", "config": GLMConfig.to_dict(), "data_state"}. `opt_state` is saved as a flat dict of its leaves
("000", "001", ...) so that any optax state structure round-trips; the tree structure comes from the
optimizer at restore time. Saves are asynchronous (device→host copies finish before save() returns, so the
donated train state may be reused right away).

Once Orbax has committed a step, process 0 hashes its files on a thread of its own and writes the step's
manifest last (train/verify.py): only then is the step complete. Rotation (`keep`) runs after that and never
deletes the newest complete step. A state with non-finite values is never saved. On resume the newest step
is verified (manifest, then the restore itself); one that fails is reported, moved to
`checkpoints/corrupt-<step>`, and the next older one is tried.

`output_dir` may be gs:// (DESIGN §3.11): Orbax writes through etils.epath and TensorStore's gcs driver. GCS has
no rename, so Orbax writes a step there in place (its commit_success.txt last); the manifest, written after
that, is what makes a step complete here as on disk. A failure of the store (a refused or failed write, retries
exhausted) is a StorageError naming the checkpoint folder (exit 2): the step being saved never gets its
manifest, and the last complete step stays as it was.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from glm_jax import storage
from train import verify
from train.config import TrainConfigError


class TrainingStopped(RuntimeError):
    """The run cannot go on (non-finite steps or state): glm-train exits 3 with this message."""


def _flat(tree) -> dict:
    return {f"{i:04d}": x for i, x in enumerate(jax.tree.leaves(tree))}


def _all_finite(tree):
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


class Checkpointer:
    def __init__(self, output_dir, keep: int, async_save: bool = True):
        self.directory = storage.epath_of(output_dir) / "checkpoints"
        # no max_to_keep: rotation is ours (after the manifest), so that a complete step is never the one deleted
        opts = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=async_save)
        with self._errors("open"):
            self.manager = ocp.CheckpointManager(
                self.directory, options=opts, item_names=("params", "opt_state", "meta")
            )
        self.keep = keep
        self.main = jax.process_index() == 0
        self.last_saved = None
        self._committing = []  # (step, meta) saved, Orbax not yet done
        self._hashing = []  # futures of manifests being written
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="glm-manifest")
        self._finite = jax.jit(_all_finite)

    def _errors(self, doing="write"):
        """The store's failures as a StorageError naming the checkpoints folder (local paths: unchanged)."""
        return storage.errors(str(self.directory), doing)

    def save(self, step: int, state, meta: dict) -> bool:
        """Queues a save of `state` at loop step `step` (no-op if that step is already saved). Refuses a state
        with non-finite values (TrainingStopped)."""
        if step == self.last_saved or step in self.manager.all_steps():
            return False
        tree = {"params": state["params"], "opt_state": state["opt_state"]}
        if not bool(np.asarray(self._finite(tree).addressable_data(0))):
            self.wait()
            raise TrainingStopped(
                f"the parameters or optimizer state at step {step} are not finite; not saved. " + self.last_good_text()
            )
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            opt_state=ocp.args.StandardSave(_flat({"step": state["step"], "opt": state["opt_state"]})),
            meta=ocp.args.JsonSave({**meta, "manifest": verify.MANIFEST}),
        )
        # Orbax's save first waits for the previous save to finish: once it returns, every step queued before this
        # one is committed, and its manifest can be written even while saves follow each other back to back
        committed, self._committing = self._committing, []
        with self._errors():
            self.manager.save(step, args=args, force=True)
        self._hand_off(committed)
        self.last_saved = step
        if self.main:
            self._committing.append((step, meta))
        self.poll()
        return True

    def poll(self, wait: bool = False) -> None:
        """Hands committed steps to the manifest thread, and rotates once their manifests are written
        (`wait`: blocks until every queued save is complete). Cheap: call it every step."""
        if not self.main:
            if wait:
                with self._errors():
                    self.manager.wait_until_finished()
            return
        if self._committing and (wait or not self.manager.is_saving_in_progress()):
            with self._errors():
                self.manager.wait_until_finished()
            committed, self._committing = self._committing, []
            self._hand_off(committed)
        if wait:
            concurrent.futures.wait(self._hashing)
        done = [f for f in self._hashing if f.done()]
        self._hashing = [f for f in self._hashing if not f.done()]
        for f in done:
            with self._errors():
                f.result()  # an error writing a manifest is an internal error, or the store's (StorageError)
        if done:
            self.rotate()

    def _hand_off(self, committed) -> None:
        """Queues the manifests of committed (step, meta) saves on the manifest thread."""
        for step, meta in committed:
            self._hashing.append(self._pool.submit(verify.write_manifest, self.directory / str(step), meta))

    def rotate(self) -> None:
        """Deletes all but the newest `keep` steps, never the newest complete (manifest) one."""
        steps = verify.step_dirs(self.directory)
        complete = [s for s, d in steps if verify.has_manifest(d)]
        keep = {s for s, _ in steps[-self.keep :]} | set(complete[-1:])
        gone = [d for s, d in steps if s not in keep and s < (complete[-1] if complete else -1)]
        for d in gone:  # (Orbax's cached step list may keep them: nothing of ours reads it for old steps)
            storage.rmtree(d) if storage.is_remote(d) else shutil.rmtree(d, ignore_errors=True)

    def last_good(self):
        """(step, folder) of the newest complete step, or None."""
        done = [(s, d) for s, d in verify.step_dirs(self.directory) if verify.has_manifest(d)]
        return done[-1] if done else None

    def last_good_text(self) -> str:
        good = self.last_good()
        return f"The last good checkpoint is step {good[0]} at {good[1]}" if good else "No checkpoint was saved"

    # ------------------------------------------------------------ resume
    def resume(self, abstract_state, check_meta, ctx=contextlib.nullcontext, say=print):
        """(state, meta) of the newest step that verifies, or (None, None) when there is no step. A step that
        fails is reported in one line and moved to checkpoints/corrupt-<step> (only once an older one has
        verified and loaded); when none does, TrainConfigError (exit 2) says what failed and nothing moves.
        `check_meta(meta)` runs before the restore (a run of another model is bad input, not a bad step), which
        runs in the context `ctx()` (the checks outside it: reading a step back builds the model's param shapes)."""
        failures = []
        for step, d in reversed(verify.step_dirs(self.directory)):
            problem = None
            if self.main:
                problem = verify.check_files(d)
            problem = gather_json(problem)[0]
            meta = None
            if problem is None:
                meta, problem = verify.read_meta(d)
            if problem is None:
                check_meta(meta)
                with ctx():
                    state, problem = self._try_restore(step, abstract_state)
                problem = next((p for p in gather_json(problem) if p), None)
            if problem is None:
                self._set_aside(failures, say)
                return state, meta
            failures.append((step, d, problem))
        if failures:
            run = self.directory.parent
            what = "; ".join(f"step {s}: {p}" for s, _, p in failures)
            raise TrainConfigError(
                f"{run}: no checkpoint verifies ({what}); fix or move checkpoints/ aside to start afresh"
            )
        return None, None

    def _try_restore(self, step, abstract_state):
        from glm_jax.checkpoint.orbax import quiet_absl

        try:
            with quiet_absl():
                state, _ = self.restore(step, abstract_state)
            return state, None
        except Exception as e:  # whatever Orbax raises: the step failed verification
            if storage.is_remote(str(self.directory)) and _unreachable(e):
                raise storage.StorageError(f"cannot read step {step}: {_short(e)}", str(self.directory)) from e
            return None, f"does not load ({_short(e)})"

    def _set_aside(self, failures, say) -> None:
        gather_json(None)  # every process is past its checks before process 0 moves folders
        if not failures:
            return
        if self.main:
            for step, d, problem in failures:
                dest = verify.move_aside(d)
                say(
                    f"warning: checkpoint step {step} at {d} failed verification: {problem}; "
                    f"moved to checkpoints/{dest.name}"
                )
        gather_json(None)
        self.manager.reload()

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
        self.poll(wait=True)

    def close(self):
        try:
            self.poll(wait=True)
        finally:
            try:
                with self._errors():
                    self.manager.close()
            finally:
                self._pool.shutdown()


def _unreachable(e: BaseException) -> bool:
    """A failed restore that says the store itself refused or could not answer (not a bad step)."""
    text = str(e)
    return any(k in text for k in ("PERMISSION_DENIED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "403", "503"))


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
