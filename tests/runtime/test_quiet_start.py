"""A newcomer's first screen: glm-train on a machine without a TPU prints no libtpu errors or warnings."""

import os
import subprocess
import sys

from helpers import ROOT

NOISE = ("TPU", "libtpu", "E0000", "InitGoogle", "host bounds")


def test_glm_train_on_cpu_prints_no_tpu_noise(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS", "TF_CPP_MIN_LOG_LEVEL")}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.main",
            "--config",
            "tiny",
            "steps=1",
            f"output_dir={tmp_path / 'run'}",
            "progress=lines",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "done: step 1" in text
    noisy = [line for line in text.splitlines() if any(n in line for n in NOISE)]
    assert not noisy, noisy


LIBRARY_USE = """
import os, sys
import jax  # sets TF_CPP_MIN_LOG_LEVEL itself: the caller's environment is what it is after this
before = dict(os.environ)
import glm_jax
lm = glm_jax.from_pretrained(sys.argv[1])
print(lm([[1, 2, 3]]).shape)
print(sorted(set(os.environ.items()) ^ set(before.items())))
"""


def test_from_pretrained_on_cpu_prints_no_tpu_noise_and_leaves_the_environment(fixtures_dir):
    """The library makes the CLIs' choice through jax.config at first use: nothing from libtpu on stderr, and the
    caller's environment is as it was (no JAX_PLATFORMS written)."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS", "TF_CPP_MIN_LOG_LEVEL")}
    out = subprocess.run(
        [sys.executable, "-c", LIBRARY_USE, str(fixtures_dir / "transformers-glm" / "model")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    shape, environ = out.stdout.splitlines()[-2:]
    assert shape.startswith("(1, 3, ")
    assert environ == "[]"
    noisy = [line for line in out.stderr.splitlines() if any(n in line for n in NOISE)]
    assert not noisy, noisy
