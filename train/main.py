"""glm-train [--config FILE] [key=value ...]

Trains a GLM model (blank infilling or causal) on the mesh given by mesh.data x mesh.fsdp x mesh.tensor, or,
with compile_only=true topology=v5p:4x4x4, compiles the train step ahead of time for a TPU topology and
writes output_dir/compile_report.json. Keys and defaults: train/config.py; presets: train/configs/*.yaml.
Exit codes: 0 ok, 2 bad input (one `error:` line on stderr), 1 internal error.
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
    from glm_jax.checkpoint import CheckpointFormatError
    from glm_jax.config import ConfigError
    from train.config import TrainConfigError

    return (TrainConfigError, ConfigError, CheckpointFormatError)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
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
        if isinstance(e, _bad_input_types()):
            msg = " ".join(str(e).split())
            print(f"error: {msg}", file=sys.stderr)
            return 2
        import traceback

        traceback.print_exc()
        print(f"error: internal error: {type(e).__name__}: {' '.join(str(e).split())[:500]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
