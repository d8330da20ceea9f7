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
