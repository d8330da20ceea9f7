"""SIGTERM in the middle of a run: the trainer saves a checkpoint, exits 0, and the checkpoint restores."""

import json
import signal
import subprocess
import time

from helpers.cli import subprocess_env
from helpers.train_runs import CACHE, checkpoint_steps, cli, metrics, tiny, train


def test_sigterm_saves_a_checkpoint_that_restores(tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen(
        cli(
            "--config",
            "tiny",
            f"output_dir={out}",
            "steps=100000",
            "checkpoint_every=100000",
            "progress=none",
            f"compilation_cache_dir={CACHE}",
        ),
        env=subprocess_env(1),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline and p.poll() is None:
            f = out / "metrics.jsonl"
            if f.exists() and len(f.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        assert p.poll() is None, p.communicate()[0][-3000:]
        p.send_signal(signal.SIGTERM)
        log = p.communicate(timeout=120)[0]
    finally:
        p.kill()
    assert p.returncode == 0, log[-3000:]
    assert "SIGTERM" in log
    steps = checkpoint_steps(out)
    assert steps and steps[-1] >= 3
    k = steps[-1]
    meta = json.loads((out / "checkpoints" / str(k) / "meta" / "metadata").read_text())
    assert meta["step"] == k and meta["data_state"]["batches"] == k
    # the checkpoint restores: a run on the same output_dir continues from step k
    summary = train(tiny(out, f"steps={k + 2}", "checkpoint_every=100000"))
    assert summary["step"] == k + 2
    assert [r["step"] for r in metrics(out)] == list(range(1, k + 3))
