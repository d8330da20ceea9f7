"""`glm-train launch-command`: the gcloud (and xpk) command lines that run one glm-train on every worker of a
Cloud TPU VM slice. It prints them and runs nothing: gcloud's `tpu-vm ssh --worker=all` starts the same
command on every host, and `jax.distributed.initialize()` (train/parallel.py init_distributed) finds its peers
from the TPU metadata. For a scheduler that restarts failed slices, xpk (GKE) takes the same glm-train line.

Every worker runs the identical line, so the run's paths are on a bucket (output_dir=gs://...): each host
writes its part of each Orbax checkpoint there, and the rerun of the same line resumes after a preemption.
"""

from __future__ import annotations

import shlex

from train.aot import accelerator_type, topology_name
from train.config import TrainConfigError

# Cloud TPU VM software versions (gcloud compute tpus tpu-vm create --version), by chip generation
RUNTIME = {"v4": "tpu-ubuntu2204-base", "v5e": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
REPO_DIR = "~/glm-jax"  # where the checkout lands on each worker
TARBALL = "glm-jax.tar.gz"  # this checkout's committed tree (git archive): no .venv, runs or caches
TPU_JAX = '"jax[tpu]==0.10.2"'  # libtpu, at the jax of requirements.txt


def _flag(name: str, value: str) -> str:
    return f"{name}={shlex.quote(value)}"


def train_line(config: str | None, overrides: list[str], output_dir: str, prefix: str = ".venv/bin/") -> str:
    """The glm-train command every worker runs."""
    args = [f"{prefix}glm-train"] + (["--config", config] if config else [])
    args += [o for o in overrides if not o.startswith("output_dir=")] + [f"output_dir={output_dir}"]
    return " ".join(shlex.quote(a) for a in args)


def commands(args) -> dict[str, str]:
    """name → command line: create, copy, install, train (every worker), tensorboard, and xpk when --cluster."""
    gen, _ = topology_name(args.topology)
    accel = accelerator_type(args.topology)
    version = args.runtime_version or RUNTIME.get(gen)
    if not version:
        raise TrainConfigError(f"no known TPU VM runtime for {gen}; give --runtime-version")
    out = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("output_dir=")), None)
    if out is None:
        if not args.bucket:
            raise TrainConfigError("give --bucket (the run goes to gs://BUCKET/NAME) or output_dir=gs://...")
        out = f"gs://{args.bucket.removeprefix('gs://').rstrip('/')}/{args.name}"
    where = [shlex.quote(args.name), _flag("--zone", args.zone)]
    ssh = ["gcloud compute tpus tpu-vm ssh", *where, _flag("--worker", "all")]
    run = f"cd {REPO_DIR} && {train_line(args.config, args.overrides, out)}"
    install = (
        f"mkdir -p {REPO_DIR} && tar -xzf ~/{TARBALL} -C {REPO_DIR} && cd {REPO_DIR} && python3 -m venv .venv"
        f" && .venv/bin/pip install -r requirements.txt {TPU_JAX} -e ."
    )
    cmds = {
        "create": " ".join(
            [
                "gcloud compute tpus tpu-vm create",
                *where,
                _flag("--accelerator-type", accel),
                _flag("--version", version),
            ]
        ),
        "copy": f"git archive -o /tmp/{TARBALL} HEAD && "
        + " ".join(
            [
                "gcloud compute tpus tpu-vm scp",
                f"/tmp/{TARBALL}",
                f"{args.name}:~",
                *where[1:],
                _flag("--worker", "all"),
            ]
        ),
        "install": " ".join([*ssh, _flag("--command", install)]),
        "train": " ".join([*ssh, _flag("--command", run)]),
        "tensorboard": " ".join(["tensorboard", _flag("--logdir", f"{out}/tensorboard")]),
    }
    if args.cluster:
        cmds["xpk"] = " ".join(
            [
                "xpk workload create",
                _flag("--cluster", args.cluster),
                _flag("--workload", args.name),
                _flag("--tpu-type", accel),
                _flag("--num-slices", "1"),
                _flag("--command", train_line(args.config, args.overrides, out, prefix="")),
            ]
        )
    return cmds
