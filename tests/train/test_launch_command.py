"""`glm-train launch-command` prints gcloud's lines for a slice; the glm-train part of its per-worker line is run
here (a tiny config on CPU) and trains. The slice names are gcloud's own: v5p counts TensorCores (2 a chip),
v5litepod chips."""

import shlex
import subprocess

from helpers.cli import subprocess_env
from helpers.train_runs import CACHE, checkpoint_steps, cli, losses

from train.main import main


def printed(capsys, *argv) -> dict[str, str]:
    assert main(["launch-command", *argv]) == 0
    text = capsys.readouterr().out
    blocks = text.strip().split("# ")[1:]
    return {b.split("\n", 1)[0]: b.split("\n", 1)[1].strip() for b in blocks}


def test_printed_train_line_trains(tmp_path, capsys):
    cmds = printed(
        capsys,
        "--name=pod-a",
        "--zone=us-east5-a",
        "--topology=v5p:4x4x4",
        "--bucket=my-bucket",
        "--config",
        "tiny",
        "steps=3",
        f"compilation_cache_dir={CACHE}",
    )
    assert cmds["create"] == (
        "gcloud compute tpus tpu-vm create pod-a --zone=us-east5-a --accelerator-type=v5p-128 --version=v2-alpha-tpuv5"
    )
    ssh = shlex.split(cmds["train"])
    assert ssh[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-a", "--zone=us-east5-a"]
    assert "--worker=all" in ssh
    remote = next(a for a in ssh if a.startswith("--command=")).removeprefix("--command=")
    cd, run = remote.split(" && ")
    assert cd == "cd ~/glm-jax"
    argv = shlex.split(run)
    assert argv[0] == ".venv/bin/glm-train" and argv[-1] == "output_dir=gs://my-bucket/pod-a"
    assert cmds["tensorboard"] == "tensorboard --logdir=gs://my-bucket/pod-a/tensorboard"
    # the worker's glm-train, here: the same arguments, output_dir on this disk
    out = tmp_path / "run"
    p = subprocess.run(
        cli(*argv[1:-1], f"output_dir={out}"), env=subprocess_env(1), capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert sorted(losses(out)) == [1, 2, 3] and checkpoint_steps(out)[-1] == 3


def test_slice_names_and_xpk(capsys):
    cmds = printed(capsys, "--name=p", "--zone=z", "--accelerator=v5litepod-16", "--bucket=gs://b/", "--cluster=c")
    assert "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite" in cmds["create"]
    assert cmds["xpk"] == (
        "xpk workload create --cluster=c --workload=p --tpu-type=v5litepod-16 --num-slices=1 "
        "--command='glm-train output_dir=gs://b/p'"
    )


def test_bad_key_or_topology_is_bad_input(capsys):
    assert main(["launch-command", "--name=p", "--zone=z", "--topology=v5e:4x4", "--bucket=b", "nope=1"]) == 2
    assert main(["launch-command", "--name=p", "--zone=z", "--topology=v9:4x4", "--bucket=b"]) == 2
    assert main(["launch-command", "--name=p", "--zone=z", "--topology=v5e:4x4"]) == 2  # no bucket, no output_dir
    err = capsys.readouterr().err
    assert err.count("error:") == 3
