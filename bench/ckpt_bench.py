"""Checkpoint stall and goodput of a glm-train run: synchronous against asynchronous Orbax saves, in one run.

Each row is a glm-train process (the tiny config widened to --hidden, so a save moves real bytes) that saves
every --every steps to a local output_dir. From the run's last metrics.jsonl record (train/loop.py Clock):
  stall/save  time/checkpoint's growth across one save (records are logged at each save step): what the loop
              waited for, the median over the saves after the first (first shown apart). Synchronous: the write.
              Asynchronous: the device→host copy; Orbax writes on its threads while the next steps run
              (and a save waits for the previous one, so a write slower than `every` steps shows up here).
  goodput     time/step / time/wall.
Ratios are asynchronous / synchronous; rows alternate (sync, async, sync, ...) so load drift hits both alike.
Every saved step must end up complete (its manifest written): the bench fails otherwise.

Local disk only: output_dir=gs:// (fake-gcs-server) needs glm-train on gs://, which is not on this branch.

    .venv/bin/python bench/ckpt_bench.py [--steps 40] [--every 5] [--hidden 256] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_once(out: pathlib.Path, asynchronous: bool, a) -> dict:
    h = a.hidden
    args = [
        "--config",
        "tiny",
        f"output_dir={out}",
        f"steps={a.steps}",
        f"checkpoint_every={a.every}",
        f"log_every={a.every}",
        "keep_checkpoints=2",
        f"async_checkpointing={'true' if asynchronous else 'false'}",
        "progress=none",
        f"model_overrides.hidden_size={h}",
        f"model_overrides.num_heads={h // 64}",
        f"model_overrides.num_kv_heads={h // 64}",
        "model_overrides.head_dim=64",
        f"model_overrides.ffn_size={4 * h}",
        f"model_overrides.num_layers={a.layers}",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "train.main", *args], env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"glm-train failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = recs[-1]
    # a record at step k·every is logged before that step's save: consecutive records bracket one save each
    per_save = [r1["time/checkpoint"] - r0["time/checkpoint"] for r0, r1 in zip(recs, recs[1:])]
    ckpts = out / "checkpoints"
    steps = [d for d in ckpts.iterdir() if d.name.isdigit()]
    incomplete = [d.name for d in steps if not (d / "glm_manifest.json").is_file()]
    if incomplete:
        sys.exit(f"{out}: steps {incomplete} have no manifest")
    size = sum(f.stat().st_size for f in (ckpts / str(a.steps)).rglob("*") if f.is_file())
    return {
        "first": per_save[0],  # the first save also compiles its finiteness check and sets Orbax up
        "stall": statistics.median(per_save[1:]),
        "goodput": last["goodput"],
        "wall": last["time/wall"],
        "step": last["time/step"] / (a.steps - 1),  # (step 1 is compile time)
        "mb": size / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    rows = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as tmp:
        for r in range(a.rounds):
            for asynchronous in (False, True):
                out = pathlib.Path(tmp) / f"{'async' if asynchronous else 'sync'}-{r}"
                res = run_once(out, asynchronous, a)
                rows[asynchronous].append(res)
                print(
                    f"round {r} {'async' if asynchronous else 'sync ':5s}: stall/save {res['stall'] * 1e3:8.1f} ms "
                    f"(first {res['first'] * 1e3:.1f}), "
                    f"goodput {res['goodput']:.3f}, step {res['step'] * 1e3:.1f} ms, wall {res['wall']:.1f} s, "
                    f"checkpoint {res['mb']:.1f} MB",
                    flush=True,
                )
    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in rows.items()}
    s, y = med[False], med[True]
    print(
        f"median of {a.rounds}: stall/save async/sync {y['stall'] / s['stall']:.3f} "
        f"({y['stall'] * 1e3:.1f} / {s['stall'] * 1e3:.1f} ms); goodput async/sync {y['goodput'] / s['goodput']:.3f} "
        f"({y['goodput']:.3f} / {s['goodput']:.3f}); stall/save sync / step {s['stall'] / s['step']:.2f}"
    )


if __name__ == "__main__":
    main()
