"""glm-train objective=grpo (train/rl/grpo.py) on the bundled toy task (train/configs/grpo_tiny.yaml): the mean
reward rises far beyond its noise, and a run stopped by SIGTERM and resumed samples, scores and updates exactly
as an uninterrupted one."""

import json
import math
import signal
import subprocess
import time

import numpy as np
from helpers.cli import subprocess_env
from helpers.train_runs import CACHE, checkpoint_steps, cli


def grpo_tiny(out, *overrides):
    from train.config import build

    return build("grpo_tiny", [f"output_dir={out}", "progress=none", f"compilation_cache_dir={CACHE}", *overrides])


def rollouts(out) -> list[dict]:
    return [json.loads(x) for x in (out / "rollouts.jsonl").read_text().splitlines() if x.strip()]


def test_toy_reward_rises_well_beyond_noise(tmp_path):
    from train.rl.grpo import train

    out = tmp_path / "run"
    train(grpo_tiny(out, "steps=120", "checkpoint_every=1000"))
    r = np.array([np.mean(x["rewards"]) for x in rollouts(out)])
    assert len(r) == 120
    first, last = r[:20], r[-20:]
    # a window mean of 20 x 128 exact-answer rewards (0 or 1) has a binomial standard error of at most
    # sqrt(0.25 / 2560) ~ 0.01; a random model answers ~1 in 12 prompts right (the chance that a sampled
    # digit is the sum), the trained one most of them
    noise = math.sqrt(0.25 / (20 * 128))
    assert first.mean() < 0.25, first
    assert last.mean() - first.mean() > max(0.3, 20 * noise), (first.mean(), last.mean())
    assert (out / "loss.png").is_file()
    m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for k in ("reward", "reward_std", "clip_ratio", "completion_length", "rollout_seconds", "update_seconds"):
        assert k in m[-1], k


def _run(out, *overrides):
    return subprocess.Popen(
        cli(
            "--config", "grpo_tiny", f"output_dir={out}", "progress=lines", f"compilation_cache_dir={CACHE}", *overrides
        ),
        env=subprocess_env(1),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sigterm_and_resume_give_the_same_completions_and_losses(tmp_path):
    # beta > 0 and num_iterations 2: the reference and the kept old log-probs are part of what must resume
    args = ("steps=100", "checkpoint_every=1000", "grpo.beta=0.04", "log_every=1")
    whole = _run(tmp_path / "whole", *args)
    assert whole.wait(timeout=600) == 0, whole.communicate()[0][-3000:]

    out = tmp_path / "cut"
    p = _run(out, *args)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None:
            f = out / "rollouts.jsonl"
            if f.exists() and len(f.read_text().splitlines()) >= 5:
                break
            time.sleep(0.05)
        assert p.poll() is None, p.communicate()[0][-3000:]
        p.send_signal(signal.SIGTERM)
        log = p.communicate(timeout=120)[0]
    finally:
        p.kill()
    assert p.returncode == 0 and "SIGTERM" in log, log[-3000:]
    k = checkpoint_steps(out)[-1]
    assert 5 <= k < 100
    resumed = _run(out, *args)
    log = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0 and "resumed from" in log, log[-3000:]

    a, b = rollouts(tmp_path / "whole"), rollouts(out)
    assert [x["step"] for x in b] == list(range(1, 101))
    assert a == b  # completions, rewards and the update losses, step by step, exactly
    ma = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(ma, mb):
        assert (x["step"], x["loss"], x["kl"], x["reward"]) == (y["step"], y["loss"], y["kl"], y["reward"])
