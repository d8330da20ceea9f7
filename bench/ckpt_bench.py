"""Checkpoint stall and goodput of a glm-train run: synchronous against asynchronous Orbax saves, in one run.

Each row is a glm-train process (the tiny config widened to --hidden, so a save moves real bytes) that saves
every --every steps to a local output_dir, or (--store gcs) to gs:// on fake-gcs-server, the GCS emulator the tests
use (tests/helpers/gcs.py), started here on 127.0.0.1. From the run's last metrics.jsonl record (train/loop.py Clock):
  stall/save  time/checkpoint's growth across one save (records are logged at each save step): what the loop
              waited for, the median over the saves after the first (first shown apart). Synchronous: the write.
              Asynchronous: the device→host copy; Orbax writes on its threads while the next steps run
              (and a save waits for the previous one, so a write slower than `every` steps shows up here).
  goodput     time/step / time/wall.
Ratios are asynchronous / synchronous; rows alternate (sync, async, sync, ...) so load drift hits both alike.
Every saved step must end up complete (its manifest written): the bench fails otherwise.

    .venv/bin/python bench/ckpt_bench.py [--steps 40] [--every 5] [--hidden 256] [--rounds 2] [--store local,gcs]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_once(out, asynchronous: bool, a, env_extra=None) -> dict:
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
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONPATH": str(ROOT),
        **(env_extra or {}),
    }
    p = subprocess.run([sys.executable, "-m", "train.main", *args], env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"glm-train failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    from glm_jax import storage
    from train import verify

    recs = [json.loads(x) for x in storage.read_text(f"{out}/metrics.jsonl").splitlines() if x.strip()]
    last = recs[-1]
    # a record at step k·every is logged before that step's save: consecutive records bracket one save each
    per_save = [r1["time/checkpoint"] - r0["time/checkpoint"] for r0, r1 in zip(recs, recs[1:])]
    steps = verify.step_dirs(f"{out}/checkpoints")
    incomplete = [s for s, d in steps if not verify.has_manifest(d)]
    if incomplete:
        sys.exit(f"{out}: steps {incomplete} have no manifest")
    last_step = dict(steps)[a.steps]
    if storage.is_remote(last_step):
        size = sum(storage.list_files(last_step).values())
    else:
        size = sum(f.stat().st_size for f in pathlib.Path(last_step).rglob("*") if f.is_file())
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
    ap.add_argument("--store", default="local", help="comma-separated: local, gcs (the emulator)")
    a = ap.parse_args()
    stores = a.store.split(",")
    rows = {(w, y): [] for w in stores for y in (False, True)}
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as tmp, contextlib.ExitStack() as stack:
        env = {}
        if "gcs" in stores:
            sys.path.insert(0, str(ROOT / "tests"))  # the tests' emulator launcher (tests/helpers/gcs.py)
            from helpers.gcs import Emulator

            emu = Emulator()
            stack.callback(emu.stop)
            env = emu.env()
            os.environ.update(env)  # this process reads the runs' metrics back from the emulator too
        for r in range(a.rounds):
            for where in stores:
                for asynchronous in (False, True):
                    name = f"{where}-{'async' if asynchronous else 'sync'}-{r}"
                    out = f"gs://glm-test/ckpt-bench/{name}" if where == "gcs" else pathlib.Path(tmp) / name
                    res = run_once(out, asynchronous, a, env if where == "gcs" else None)
                    rows[where, asynchronous].append(res)
                    print(
                        f"round {r} {where:5s} {'async' if asynchronous else 'sync ':5s}: stall/save "
                        f"{res['stall'] * 1e3:8.1f} ms (first {res['first'] * 1e3:.1f}), goodput {res['goodput']:.3f}, "
                        f"step {res['step'] * 1e3:.1f} ms, wall {res['wall']:.1f} s, checkpoint {res['mb']:.1f} MB",
                        flush=True,
                    )
    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in rows.items()}
    for where in stores:
        s, y = med[where, False], med[where, True]
        print(
            f"{where}, median of {a.rounds}: stall/save async/sync {y['stall'] / s['stall']:.3f} "
            f"({y['stall'] * 1e3:.1f} / {s['stall'] * 1e3:.1f} ms); goodput async/sync "
            f"{y['goodput'] / s['goodput']:.3f} ({y['goodput']:.3f} / {s['goodput']:.3f}); "
            f"stall/save sync / step {s['stall'] / s['step']:.2f}"
        )
    if len(stores) == 2:
        g, l_ = med["gcs", True], med["local", True]
        print(
            f"async stall/save gcs / local {g['stall'] / l_['stall']:.2f}; "
            f"goodput gcs / local {g['goodput'] / l_['goodput']:.3f}"
        )


if __name__ == "__main__":
    main()
