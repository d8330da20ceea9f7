"""A pod's preemption, on this host: two processes (jax.distributed on 127.0.0.1, 4 CPU devices each) train one
run. A SIGTERM sent to only ONE of them stops both at the same step, each saves its part of one checkpoint and
exits 0; rerunning the same command resumes, and the losses are bit-identical to a run never interrupted.

Both ways of agreeing are run: jax's preemption sync point (the default), with the run on gs:// (the GCS emulator,
as on a pod: both processes write one checkpoint to one bucket), and, with JAX_ENABLE_PREEMPTION_SERVICE off, the
all-gather of each process's SIGTERM flag (train/loop.py Stop), on a local folder."""

import json
import re
import signal
import subprocess
import time
import uuid

import numpy as np
import pytest
from helpers.cli import subprocess_env
from helpers.train_runs import CACHE, MESH_222, checkpoint_steps, cli, free_port, losses

from glm_jax import storage
from train import verify


def run_losses(out) -> dict:
    if not storage.is_remote(out):
        return losses(out)
    recs = [json.loads(x) for x in storage.read_text(f"{out}/metrics.jsonl").splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def complete_steps(out) -> list[int]:
    if not storage.is_remote(out):
        return checkpoint_steps(out)
    return [s for s, d in verify.step_dirs(f"{out}/checkpoints") if verify.has_manifest(d)]


def logged_lines(out) -> int:
    f = f"{out}/metrics.jsonl"
    return len(storage.read_text(f).splitlines()) if storage.exists(f) else 0


def launch(out, *extra, env_extra=None):
    port = free_port()
    args = [
        "--config",
        "tiny",
        f"output_dir={out}",
        "steps=100000",  # the schedule: every run here uses the same one (stop_at ends the short ones)
        "checkpoint_every=100000",
        "progress=lines",
        f"compilation_cache_dir={CACHE}",
        *MESH_222,
        f"distributed.coordinator=127.0.0.1:{port}",
        "distributed.num_processes=2",
        *extra,
    ]
    env = {**subprocess_env(4), **(env_extra or {})}
    return [
        subprocess.Popen(
            cli(*args, f"distributed.process_id={i}"),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]


def finish(procs, timeout=300) -> list[str]:
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


@pytest.mark.parametrize("agree,where", [("sync_point", "gs"), ("all_gather", "local")])
def test_sigterm_to_one_process_stops_both_at_one_step(tmp_path, request, agree, where):
    env = {"JAX_ENABLE_PREEMPTION_SERVICE": "false"} if agree == "all_gather" else {}
    run, ref = tmp_path / "run", tmp_path / "ref"
    if where == "gs":
        env.update(request.getfixturevalue("gcs").env())
        run = f"gs://glm-test/pod-{uuid.uuid4().hex[:8]}"
    procs = launch(run, env_extra=env)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and all(p.poll() is None for p in procs):
            if logged_lines(run) >= 3:
                break
            time.sleep(0.2)
        assert all(p.poll() is None for p in procs), [p.communicate()[0][-2000:] for p in procs]
        procs[1].send_signal(signal.SIGTERM)  # process 1 only; process 0 learns it from the agreement
    finally:
        outs = finish(procs)
    assert "SIGTERM: saving a checkpoint" in outs[0]  # (process 0 speaks for the run)
    stops = [re.findall(r"done: step (\d+)", out) for out in outs]
    assert len(stops[0]) == 1 and stops[0] == stops[1], outs[0][-2000:] + outs[1][-2000:]
    k = int(stops[0][0])
    assert k >= 3 and complete_steps(run) == [k]
    assert sorted(run_losses(run)) == list(range(1, k + 1))

    # the same command again resumes at k; a run never interrupted is the reference
    outs = finish(launch(run, f"stop_at={k + 3}", env_extra=env))
    assert f"(step {k})" in outs[0]
    finish(launch(ref, f"stop_at={k + 3}", env_extra=env))
    got, want = run_losses(run), losses(ref)
    assert sorted(got) == sorted(want) == list(range(1, k + 4))
    np.testing.assert_array_equal([got[s] for s in sorted(got)], [want[s] for s in sorted(want)])
