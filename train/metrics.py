"""What a run reports: metrics.jsonl, TensorBoard events, loss.png, and a progress bar or log lines.

Only process 0 writes. On resume, metrics.jsonl keeps the lines up to the restored step, so the file reads as
one uninterrupted run.

On GCS (output_dir=gs://...) an object cannot be appended to, and one object takes about one write a second: the
reporter keeps metrics.jsonl's lines and TensorBoard's event files (tensorboardX writes them to a local staging
folder) and uploads each whole, at most every REMOTE_FLUSH_S and at close. A run killed outright loses at most
that many seconds of lines; a resume keeps the lines up to its restored step either way.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import sys
import tempfile
import time

import jax
import numpy as np

from glm_jax import storage

REMOTE_FLUSH_S = 2.0

# bf16 dense peak per chip (the MFU denominator), by jax device_kind
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def device_peak_flops(override: float = 0.0) -> tuple[float, str]:
    """(FLOP/s per device, where the figure came from)."""
    if override > 0:
        return override, "config"
    kind = jax.devices()[0].device_kind
    for k in sorted(PEAK_FLOPS, key=len, reverse=True):
        if kind.startswith(k):
            return PEAK_FLOPS[k], f"table ({kind})"
    return measure_matmul_peak(), "measured float32 matmul"


def measure_matmul_peak(sizes=(1024, 2048), repeats: int = 6, dtype="float32") -> float:
    """FLOP/s of one device's jnp matmul: the best of `repeats` timed products at each size. Two sizes and the
    best of all: on a shared host one busy moment during a single 1024 product read the peak at half its
    value (and the MFU estimate at 137%)."""
    import jax.numpy as jnp

    f = jax.jit(lambda a: a @ a)
    best = 0.0
    for n in sizes:
        x = jax.device_put(jnp.full((n, n), 0.01, dtype), jax.devices()[0])
        f(x).block_until_ready()
        for _ in range(repeats):
            t = time.perf_counter()
            f(x).block_until_ready()
            best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def _summary_writer():
    """tensorboardX.SummaryWriter, imported without pulling in torch (tensorboardX imports it when it can,
    which costs seconds and is needed only for torch tensors)."""
    import sys

    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` inside tensorboardX raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def _clean(v):
    v = float(v)
    return v if math.isfinite(v) else None


class Reporter:
    def __init__(
        self, output_dir, total_steps: int, start_step: int, progress: str = "auto", plot_every_s: float = 10.0
    ):
        self.remote = storage.is_remote(output_dir)
        self.dir = storage.as_path(output_dir)
        self.main = jax.process_index() == 0
        self.history: list[dict] = []
        self.eval_history: list[dict] = []
        self.plot_every_s = plot_every_s
        self._last_plot = 0.0
        self.bar = None
        self.tb = None
        if not self.main:
            return
        self.path = self.dir / "metrics.jsonl"
        kept = []
        if not self.remote:
            self.dir.mkdir(parents=True, exist_ok=True)
        if storage.exists(self.path):  # keep the lines of steps that the restored checkpoint covers
            for line in storage.read_text(self.path).splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("step", 0) <= start_step:
                    kept.append(line)
                    if "loss" in rec:
                        self.history.append(rec)
                    if "eval_loss" in rec:
                        self.eval_history.append(rec)
        self._lines, self._flushed = kept, 0.0
        self._staging = tempfile.mkdtemp(prefix="glm-tb-") if self.remote else None
        if self.remote:
            storage.write_text(self.path, "".join(x + "\n" for x in kept))
            self.fh = None
        else:
            self.path.write_text("".join(x + "\n" for x in kept))
            self.fh = open(self.path, "a")  # noqa: SIM115 - kept open for the run, closed by close()
        tb_dir = pathlib.Path(self._staging) if self.remote else self.dir / "tensorboard"
        self.tb = _summary_writer()(str(tb_dir), purge_step=start_step + 1 if start_step else None)
        mode = progress
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def log(self, rec: dict) -> None:
        if not self.main:
            return
        rec = {k: (_clean(v) if isinstance(v, (float, np.floating)) else v) for k, v in rec.items()}
        step = rec["step"]
        for k, v in rec.items():
            if k != "step" and isinstance(v, (int, float)) and v is not None:
                self.tb.add_scalar(("eval/" if k.startswith("eval_") else "train/") + k, v, step)
        if self.remote:
            self._lines.append(json.dumps(rec))
            self.flush_remote()
        else:
            self.fh.write(json.dumps(rec) + "\n")
            self.fh.flush()
        self.history.append(rec)
        f = lambda k, spec: "nan" if rec.get(k) is None else format(rec[k], spec)  # noqa: E731
        if "reward" in rec:  # objective=grpo: the reward, and rollout vs update time (train/rl/grpo.py)
            line = (
                f"step {step}: reward {f('reward', '.3f')} ± {f('reward_std', '.3f')}  loss {f('loss', '.4f')}"
                + (f"  kl {f('kl', '.4f')}" if "kl" in rec else "")
                + f"  clip {f('clip_ratio', '.3f')}  len {f('completion_length', '.1f')}"
                f"  grad_norm {f('grad_norm', '.3f')}  lr {f('learning_rate', '.2e')}"
                f"  rollout {f('rollout_seconds', '.2f')}s  update {f('update_seconds', '.2f')}s"
            )
        else:
            line = (
                f"step {step}: loss {f('loss', '.4f')}  acc {f('accuracy', '.3f')}  grad_norm {f('grad_norm', '.3f')}"
                f"  lr {f('learning_rate', '.2e')}  {f('tokens_per_second', ',.0f')} tok/s  "
                f"mfu {100 * (rec.get('mfu') or 0):.1f}%"
            )
        line += f"  skipped {rec['skipped_steps']}" if rec.get("skipped_steps") else ""
        if "eval_loss" in rec:
            self.eval_history.append(rec)
            line += f"  eval_loss {f('eval_loss', '.4f')}"
        if self.bar is not None:
            self.bar.set_postfix(loss=f("loss", ".4f"))
        if self.mode == "lines" or self.bar is not None:
            self.say(line)
        if time.time() - self._last_plot > self.plot_every_s:
            self.plot()

    def flush_remote(self, force: bool = False) -> None:
        """Uploads metrics.jsonl and the TensorBoard event files whole (GCS: at most every REMOTE_FLUSH_S)."""
        if not (self.main and self.remote) or (not force and time.monotonic() - self._flushed < REMOTE_FLUSH_S):
            return
        storage.write_text(self.path, "".join(x + "\n" for x in self._lines))
        self.tb.flush()
        for f in sorted(pathlib.Path(self._staging).iterdir()):
            storage.write_bytes(self.dir / "tensorboard" / f.name, f.read_bytes())
        self._flushed = time.monotonic()

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def say(self, msg: str, always: bool = False) -> None:
        """A line on the terminal (process 0); `always` lines (warnings, stops) print even with progress=none."""
        if not self.main or (self.mode == "none" and not always):
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def plot(self) -> None:
        if not self.main or not self.history:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        pts = [(r["step"], r["loss"]) for r in self.history if r.get("loss") is not None]
        if pts:
            ax.plot(*zip(*pts), label="train loss")
        ev = [(r["step"], r["eval_loss"]) for r in self.eval_history if r.get("eval_loss") is not None]
        if ev:
            ax.plot(*zip(*ev), "o-", label="eval loss")
        rw = [(r["step"], r["reward"]) for r in self.history if r.get("reward") is not None]
        if rw:  # objective=grpo: the mean reward on a second axis
            ax2 = ax.twinx()
            ax2.plot(*zip(*rw), color="tab:green", label="mean reward")
            ax2.set_ylabel("mean reward")
            ax2.legend(loc="upper right")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats / loss token)" if not rw else "GRPO loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        if self.remote:  # one object, written whole
            import io

            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=100)
            plt.close(fig)
            storage.write_bytes(self.dir / "loss.png", buf.getvalue())
        else:
            tmp = self.dir / "loss.png.tmp"
            fig.savefig(tmp, format="png", dpi=100)
            plt.close(fig)
            tmp.replace(self.dir / "loss.png")
        self._last_plot = time.time()

    def close(self) -> None:
        if not self.main:
            return
        try:
            self.plot()
            self.flush_remote(force=True)  # (the events are flushed before the writer closes)
        finally:
            self.tb.close()
            if self.fh is not None:
                self.fh.close()
            if self._staging:
                shutil.rmtree(self._staging, ignore_errors=True)
            if self.bar is not None:
                self.bar.close()
