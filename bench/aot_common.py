"""What the ahead-of-time tables (bench/aot_table.py, bench/aot_named.py) share: one compile_only run of glm-train
in its own process, the results kept per commit in a JSON file, and the memory cells of a markdown row."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
GIB = 1024**3


def commit() -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()


def memory_cells(r) -> str:
    """'| GiB per chip | HBM GiB | fits |' of one compile report (None, or a row that did not run: 'not run')."""
    if r is None or "error" in r:
        return f"| {'not run' if r is None else 'error: ' + r['error'][:80]} | | |"
    mem, hbm = r["peak_memory_bytes_per_device"], r["hbm_bytes_per_device"]
    mem = "?" if mem is None else f"{mem / GIB:.2f}"
    hbm = "?" if not hbm else f"{hbm / GIB:.2f}"
    return f"| {mem} | {hbm} | {dict([(True, 'yes'), (False, 'no')]).get(r['fits'], '?')} |"


def shape_cell(r) -> str:
    return "" if r is None or "error" in r else f"{r['batch_size']} x {r['seq_len']}"


def run_named(checks, path, head) -> dict:
    """Run {name: (config, args)} compile_only checks not yet done at this commit; results kept in path."""
    done = json.loads(path.read_text()) if path.exists() else {}
    for name, (config, cargs) in checks.items():
        if done.get(name, {}).get("commit") == head and "error" not in done[name]:
            continue
        print(f"glm-train --config {config} {' '.join(cargs)}", flush=True)
        done[name] = run_row(config=config, args=cargs) | {"commit": head, "args": cargs}
        path.write_text(json.dumps(done, indent=1) + "\n")
        print("   ", done[name].get("verdict") or done[name].get("error"), flush=True)
    return done


def run_row(config: str, args=()) -> dict:
    """`glm-train --config train/configs/{config}.yaml ARGS compile_only=true` in its own process (flops
    extrapolation off unless ARGS set it): the compile report's memory, flops and verdict, or its error."""
    with tempfile.TemporaryDirectory() as out:
        flops = [] if any(a.startswith("flops_extrapolate=") for a in args) else ["flops_extrapolate=false"]
        cmd = [sys.executable, "-m", "train.main", "--config", f"train/configs/{config}.yaml", *args, *flops]
        cmd += ["progress=none", f"output_dir={out}"]
        t0 = time.time()
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        secs = time.time() - t0
        path = pathlib.Path(out) / "compile_report.json"
        if p.returncode != 0 or not path.exists():
            tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
            return {"error": f"exit {p.returncode}: {' | '.join(tail)}", "seconds": secs}
        r = json.loads(path.read_text())
    keep = (
        "fits", "peak_memory_bytes_per_device", "hbm_bytes_per_device", "mesh", "attention_kernel", "verdict",
        "flops_xla_measured", "flops_attention_kernel_computed", "model_flops_per_step",
        "xla_over_model_flops", "total_over_model_flops", "flops_source", "memory_source", "topology", "batch_size",
        "seq_len", "model",
    )  # fmt: skip
    return {k: r.get(k) for k in keep} | {"flops_total": r.get("flops"), "seconds": secs}
