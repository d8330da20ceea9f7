"""glm-train [--config FILE] [key=value ...]  |  glm-train verify RUN  |  glm-train launch-command ...

Trains a GLM model (blank infilling or causal) on the mesh given by mesh.data x mesh.fsdp x mesh.tensor, or,
with compile_only=true topology=v5p:4x4x4, compiles the train step ahead of time for a TPU topology and
writes output_dir/compile_report.json. Keys and defaults: train/config.py; presets: train/configs/*.yaml.
`glm-train verify RUN` checks every checkpoint of a run against its manifest and reads it back, one line a step.
`glm-train launch-command --name N --zone Z --topology T --bucket B [--config FILE] [key=value ...]` prints the
gcloud commands that create a TPU VM slice and run that glm-train on every worker (train/launch.py).
Exit codes: 0 ok, 2 bad input (one `error:` line on stderr; for verify: a checkpoint failed), 3 the run stopped
(max_skipped_steps consecutive non-finite steps, or a non-finite state; the last good checkpoint is kept),
1 internal error.
"""

from __future__ import annotations

import argparse
import sys

from glm_jax.platform import use_cpu_when_no_accelerator


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="glm-train", description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", help="YAML file (a name in train/configs/ also works, e.g. --config default)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. mesh.fsdp=4 steps=100")
    return ap.parse_intermixed_args(argv)  # --config may stand anywhere among the key=value items


def _bad_input_types():
    from glm_jax.config import ConfigError
    from glm_jax.errors import CheckpointFormatError, StorageError
    from train.config import TrainConfigError

    return (TrainConfigError, ConfigError, CheckpointFormatError, StorageError)  # StorageError: DESIGN §3.11


def verify_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="glm-train verify", description="checks every checkpoint of a glm-train run")
    ap.add_argument("run", help="a run directory (output_dir) or its checkpoints/ folder")
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    use_cpu_when_no_accelerator()
    try:
        from train.verify import verify_run

        rc = verify_run(args.run, say=_say)
        if rc:
            print(f"error: {args.run}: a checkpoint failed verification (lines above)", file=sys.stderr)
        return rc
    except Exception as e:
        return _report(e)


def launch_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="glm-train launch-command",
        description="prints the commands that create a Cloud TPU VM slice and run this glm-train on every worker",
    )
    ap.add_argument("--name", required=True, help="the TPU VM (slice) name; also the run's folder in the bucket")
    ap.add_argument("--zone", required=True, help="its zone, e.g. us-east5-a")
    ap.add_argument("--topology", "--accelerator", required=True, help="e.g. v5p:4x4x4, v5p-128, v5litepod-16")
    ap.add_argument("--bucket", default="", help="output_dir becomes gs://BUCKET/NAME (unless output_dir= is given)")
    ap.add_argument("--runtime-version", default="", help="TPU VM software version (default: the chip's own)")
    ap.add_argument("--cluster", default="", help="a GKE cluster made by xpk: also print the xpk workload line")
    ap.add_argument("--config", help="as for glm-train")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="as for glm-train")
    return ap


def launch_main(argv) -> int:
    try:
        args = launch_parser().parse_intermixed_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    args.topology = args.topology.replace("v5litepod-", "v5e-")  # gcloud's name for v5e slices
    try:
        from train.config import build
        from train.launch import commands

        build(args.config, args.overrides)  # a bad key is bad input here, not on every worker
        for name, line in commands(args).items():
            print(f"# {name}\n{line}")
        return 0
    except Exception as e:
        return _report(e)


def _say(line: str) -> None:
    print(line, flush=True)


def _report(e: Exception) -> int:
    """The exit code of an exception, and its one `error:` line (a traceback too for an internal error)."""
    from train.checkpointing import TrainingStopped

    msg = " ".join(str(e).split())
    if isinstance(e, _bad_input_types()):
        print(f"error: {msg}", file=sys.stderr)
        return 2
    if isinstance(e, TrainingStopped):
        print(f"error: {msg}", file=sys.stderr)
        return 3
    import traceback

    traceback.print_exc()
    print(f"error: internal error: {type(e).__name__}: {msg[:500]}", file=sys.stderr)
    return 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "verify":
        return verify_main(argv[1:])
    if argv and argv[0] == "launch-command":
        return launch_main(argv[1:])
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse: --help exits 0, a bad option 2
        return int(e.code or 0)
    use_cpu_when_no_accelerator()  # before JAX starts: no libtpu probing on a machine without a TPU
    try:
        from train.config import build

        tc = build(args.config, args.overrides)
        if tc.compile_only:
            from train.aot import compile_report

            report = compile_report(tc)
            print(report["verdict"], flush=True)
        else:
            from glm_jax import hostmem

            hostmem.apply(tc.host_heap)  # before the JAX backend starts its threads
            from train.parallel import init_distributed

            init_distributed(tc.distributed)
            if tc.objective == "grpo":  # rollouts, rewards and updates: its own loop on a Run (train/rl/grpo.py)
                from train.rl.grpo import train
            else:
                from train.trainer import train

            summary = train(tc)
            if summary.get("loss") is not None:
                print(
                    f"done: step {summary['step']}, loss {summary['loss']:.4f}, outputs in {summary['output_dir']}",
                    flush=True,
                )
        return 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 1
    except Exception as e:
        return _report(e)


if __name__ == "__main__":
    sys.exit(main())
