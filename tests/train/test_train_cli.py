"""glm-train as a command: outputs of a run, and exit code 2 with one `error:` line for bad input."""

import json
import subprocess

import helpers
from helpers.cli import Result, subprocess_env
from helpers.train_runs import CACHE, cli

REQUIRED = ("step", "loss", "learning_rate", "grad_norm", "tokens_per_second", "mfu")

# Model flops per token of the tiny config (D=32, 2 layers, 2 heads of 16, FFN 128, vocab 8192 tied, T=64), counted
# by hand: 6 x (non-embedding params + the tied output projection) + 12 x L x T x N x H for attention.
_LAYER = (
    3 * (32 * 32 + 32) + (32 * 32 + 32) + (32 * 128 + 128) + (128 * 32 + 32) + 2 * 2 * 32
)  # q k v, o, up, down, norms
TINY_FLOPS_PER_TOKEN = 6 * (2 * _LAYER + 2 * 32 + 8192 * 32) + 12 * 2 * 64 * 2 * 16


def test_cli_run_writes_metrics_plot_events_and_checkpoints(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run(
        cli(
            "--config",
            "tiny",
            f"output_dir={out}",
            "steps=4",
            "checkpoint_every=2",
            "eval_every=2",
            "eval_batches=1",
            "mesh.data=2",
            "peak_flops=1e9",
            f"compilation_cache_dir={CACHE}",
        ),
        env=subprocess_env(2),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "step 4: loss" in r.stdout
    assert "freed host memory kept for reuse" in r.stdout  # host_heap=auto on CPU (glm_jax/hostmem.py)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in recs if "loss" in x]
    assert [x["step"] for x in train] == [1, 2, 3, 4]
    for x in train:
        assert all(k in x for k in REQUIRED) and x["loss"] > 0 and x["tokens_per_second"] > 0
        # MFU: achieved model FLOP/s over the peak of the 2 devices (peak_flops is per device)
        assert abs(x["mfu"] - x["tokens_per_second"] * TINY_FLOPS_PER_TOKEN / 2e9) <= 1e-9 * x["mfu"]
    assert [x["step"] for x in recs if "eval_loss" in x] == [2, 4]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    for step in (2, 4):
        d = out / "checkpoints" / str(step)
        assert all((d / item).is_dir() for item in ("params", "opt_state", "meta"))
        meta = json.loads((d / "meta" / "metadata").read_text())
        assert meta["step"] == step and meta["config"]["family"] == "glm" and meta["data_state"]["batches"] == step


def test_cli_bad_input_exits_2_with_one_error_line(tmp_path, run_main):
    """The command in a subprocess (its exit status), then the other cases through main() in this process."""
    from train.main import main

    argv = cli("steps=10", "no_such_key=1")
    r = subprocess.run(argv, env=subprocess_env(1), capture_output=True, text=True, timeout=120)
    assert "unknown config key" in Result(r.returncode, r.stdout, r.stderr).error_line()
    for args, expect in [
        (("steps=ten",), "steps"),
        (("--config", "no_such_file.yaml"), "not found"),
        (("mesh.tensor=0",), "mesh"),
        (("host_heap=never",), "host_heap"),
        (("model=no_such_preset", f"output_dir={tmp_path}"), "model=no_such_preset"),
    ]:
        r = run_main(main, *args)
        assert expect in r.error_line(), (args, r.err)


def test_every_bundled_config_builds():

    from train.config import build

    names = sorted(p.stem for p in (helpers.ROOT / "train" / "configs").glob("*.yaml"))
    assert {"default", "tiny", "chatglm3_6b_pretrain", "glm4_9b_pretrain", "glm4_9b_finetune"} <= set(names)
    for name in names:
        tc = build(name, [])
        assert tc.steps > 0 and tc.model
    ft = build("glm4_9b_finetune", [])
    assert ft.freeze == ["embed/*"] and ft.seq_len == 2048 and ft.scan_layers is True  # base merged


def test_compile_only_scans_the_layers_unless_the_user_chose(tmp_path):
    """A plan for a topology scans (one layer compiled, not 40 unrolled); a training run keeps the per-layer
    default; an explicit scan_layers, from the command line or a config file, stands either way."""
    from train.config import build
    from train.model_setup import model_config

    plan = ("model=glm4_9b", "compile_only=true", "topology=v5p:4x4x4")
    assert build(None, plan).scan_layers is True
    assert model_config(build(None, plan))[0].scan_layers is True  # what the compiled model gets
    assert build(None, plan[:1]).scan_layers is False
    assert build(None, (*plan, "scan_layers=false")).scan_layers is False
    unrolled = tmp_path / "unrolled.yaml"
    unrolled.write_text("model: glm4_9b\nscan_layers: false\n")
    assert build(str(unrolled), plan[1:]).scan_layers is False
    assert build("tiny", plan[1:]).scan_layers is True  # tiny.yaml leaves scan_layers to the default
