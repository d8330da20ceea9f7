"""The training loop's pieces: a clock that splits the wall time, the loop's hooks (eval, log, checkpoint, stop)
and the SIGTERM / skipped-step rules. train.trainer.train strings them together.

Where the time goes (the `time/*` metrics, cumulative seconds since the process started the run, and `goodput`,
the share of that wall time spent in productive steps; MaxText's and ML Goodput's split):
- startup / restore: building the model and its state, from a checkpoint when resuming;
- compile: the first step, compilation included (its compute is not counted as productive);
- data: the host waiting for the next batch. Steps are dispatched asynchronously, so the device may still be
  running the previous step meanwhile: this is the host's wait, an upper bound on the device's data stall;
- eval, checkpoint: evaluation, and the part of a save the loop waits for (an asynchronous save returns once
  the arrays are copied off the device; its writes overlap the next steps);
- step: everything else in the loop, i.e. the steps themselves (measured by blocking at each log line).
"""

from __future__ import annotations

import contextlib
import signal
import time

import jax
import numpy as np

PHASES = ("startup", "restore", "compile", "data", "eval", "checkpoint", "step")


class Clock:
    """Wall time by phase. `phase(name)` times a block; the rest of a window (since the last `window()` call)
    is step time."""

    def __init__(self):
        self.total = dict.fromkeys(PHASES, 0.0)
        self.start = self._mark = time.perf_counter()
        self._paused = self._data = 0.0  # non-step seconds, and data seconds, inside the current window

    @contextlib.contextmanager
    def phase(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t
            self.total[name] += dt
            self._paused += dt
            if name == "data":
                self._data += dt

    def window(self) -> float:
        """Seconds of steps and data waits in the window that ends now (the throughput's denominator: eval,
        checkpoint and compile time excluded); the window's step time is added to the total."""
        now = time.perf_counter()
        step = max(now - self._mark - self._paused, 0.0)
        self.total["step"] += step
        busy = step + self._data
        self._mark, self._paused, self._data = now, 0.0, 0.0
        return busy

    def metrics(self) -> dict:
        wall = max(time.perf_counter() - self.start, 1e-9)
        out = {f"time/{k}": v for k, v in self.total.items()}
        out["time/wall"] = wall
        out["goodput"] = self.total["step"] / wall
        return out


class Stop:
    """A preemption notice seen by any process → every process finishes the same step, saves a checkpoint and
    exits 0. `requested(step)` is asked after every step.

    Several processes: jax's preemption sync point (multihost_utils.reached_preemption_sync_point). The preemption
    sync manager that jax.distributed.initialize starts (jax_enable_preemption_service, on by default, CPU
    included) catches SIGTERM, the notice a Cloud TPU preemption or maintenance event and a GKE eviction send,
    on any host; the coordination service then picks one step (the hosts' newest step + 1) at which it answers
    True on every host. Asking costs a flag read, no collective. Our own SIGTERM handler would replace the
    manager's, so none is installed then.
    Without a sync manager (the service turned off, or a jax without it): our SIGTERM flag, all-gathered after
    every step, a collective each step (bench/stop_bench.py measures it against a step).
    One process: the flag.
    """

    def __init__(self):
        self.flag = False
        self.sync = _preemption_sync_point()
        self.old = {} if self.sync else {signal.SIGTERM: signal.signal(signal.SIGTERM, self._handle)}

    def _handle(self, signum, frame):
        self.flag = True

    def requested(self, step: int) -> bool:
        if self.sync:
            return self.sync(step)
        if jax.process_count() == 1:
            return self.flag
        from jax.experimental import multihost_utils

        return bool(np.max(multihost_utils.process_allgather(np.array([int(self.flag)], np.int32))))

    def restore(self):
        for sig, h in self.old.items():
            signal.signal(sig, h)


def _preemption_sync_point():
    """multihost_utils.reached_preemption_sync_point when this is one of several processes and jax's preemption
    sync manager runs, else None. (Asking at step 0 is harmless: the steps asked after it are larger.)"""
    if jax.process_count() == 1:
        return None
    try:
        from jax.experimental.multihost_utils import reached_preemption_sync_point

        reached_preemption_sync_point(0)
    except (ImportError, RuntimeError):  # RuntimeError: jax_enable_preemption_service is off
        return None
    return reached_preemption_sync_point


class Skips:
    """Consecutive skipped (non-finite) steps; `limit` of them in a row stop the run (0: never)."""

    def __init__(self, limit: int):
        self.limit, self.n, self.first, self.last = limit, 0, 0, 0

    def add(self, step: int, skipped: bool) -> None:
        if skipped:
            self.first, self.last, self.n = self.first or step, step, self.n + 1
        else:
            self.first, self.last, self.n = 0, 0, 0

    def over(self) -> bool:
        return bool(self.limit) and self.n >= self.limit


class Loop:
    """One run's steps and hooks. `run` is a train.trainer.Run, `rep` its train.metrics.Reporter."""

    def __init__(self, run, rep, clock: Clock, flops_per_step: float, peak: float):
        tc = run.tc
        self.run, self.rep, self.clock, self.tc = run, rep, clock, tc
        self.step = run.start_step
        self.last = min(tc.steps, tc.stop_at or tc.steps)
        self.tokens_per_step = tc.batch_size * tc.seq_len
        self.flops_per_step, self.peak = flops_per_step, peak * run.mesh.devices.size
        self.pending, self.since_log, self.compiled = [], 0, False
        self.last_loss = None
        self.skips = Skips(tc.max_skipped_steps)
        self.nan_steps = set(tc.debug_nan_steps)

    # ------------------------------------------------------------ the step
    def train_step(self):
        run = self.run
        with self.clock.phase("data"):
            local = run.next_batch(nan=(self.step + 1) in self.nan_steps)
        # the first step compiles (at its call) and runs: its time is compile time, not step time
        with self.clock.phase("compile") if not self.compiled else contextlib.nullcontext():
            with run.ctx():
                batch = run.device_batch(local)  # the first call also builds step_fn for the batch's shardings
                run.state, m = run.step_fn(run.state, batch)
            if not self.compiled:
                jax.block_until_ready(m)
        self.step += 1
        self.since_log += 1
        self.pending.append(m)
        self.rep.advance()
        if not self.compiled:
            self.rep.say(f"compiled and ran step {self.step} in {self.clock.total['compile']:.1f}s")
            self.compiled = True

    # ------------------------------------------------------------ hooks
    def evaluate_if_due(self) -> dict:
        run = self.run
        if run.eval_data is None or self.step % self.tc.eval_every:
            return {}
        jax.block_until_ready(run.state)  # the steps so far belong to the step time
        with self.clock.phase("eval"):
            return run.evaluate()

    def log_if_due(self, extra: dict) -> None:
        if not (self.step % self.tc.log_every == 0 or self.step == self.tc.steps or extra):
            return
        vals = jax.device_get(self.pending)  # waits for the pending steps
        busy = max(self.clock.window(), 1e-9)
        n = self.since_log or len(vals)
        rec = summarise(self.step, vals, self.tokens_per_step * n / busy, self.flops_per_step * n / busy / self.peak)
        for i, v in enumerate(vals):
            at = self.step - len(vals) + i + 1
            self.skips.add(at, bool(v["skipped"]))
            if v["skipped"]:
                self.rep.say(
                    f"warning: step {at}: non-finite loss or gradient (loss {float(v['loss'])}); "
                    "the update was skipped",
                    always=True,
                )
        self.rep.log({**rec, **extra, **self.clock.metrics()})
        self.last_loss = rec["loss"]
        self.pending, self.since_log = [], 0

    def checkpoint_if_due(self) -> None:
        if self.step % self.tc.checkpoint_every == 0:
            self.save()
        self.run.checkpointer.poll()  # manifests of committed saves, then rotation

    def save(self) -> None:
        jax.block_until_ready(self.run.state)  # the steps so far belong to the step time
        with self.clock.phase("checkpoint"):
            self.run.save(self.step)

    def stop_requested(self, stop: Stop) -> bool:
        if stop.requested(self.step):
            self.rep.say(f"SIGTERM: saving a checkpoint at step {self.step} and stopping", always=True)
            return True
        return False


def summarise(step, vals, tps, mfu) -> dict:
    ok = [v for v in vals if not v["skipped"]]

    def mean(k):
        return float(np.mean([float(v[k]) for v in ok])) if ok else float("nan")

    rec = {
        "step": step,
        "loss": mean("loss"),
        "accuracy": mean("accuracy"),
        "grad_norm": mean("grad_norm"),
        "learning_rate": float(vals[-1]["learning_rate"]),
        "tokens_per_second": tps,
        "mfu": mfu,
        "loss_tokens": float(np.mean([float(v["loss_tokens"]) for v in vals])),
        "skipped_steps": int(sum(int(v["skipped"]) for v in vals)),
    }
    if any(float(v["z_loss"]) for v in ok):
        rec["z_loss"] = mean("z_loss")
    for k in vals[0]:  # train/moe_rules.py's metrics: mtp_loss, moe/...; dsa/... (train/dsa.py); dpo's rewards/...
        if k.startswith(("moe/", "mtp_", "dsa/", "rewards/")):
            rec[k] = mean(k)
    return rec
