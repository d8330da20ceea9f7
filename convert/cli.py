"""glm-convert: PyTorch checkpoints ↔ glm-jax, streamed one tensor at a time.

    glm-convert to-jax   SRC DST [--dtype float32|bfloat16|float16] [--mesh DATA,FSDP,TENSOR]
                                 [--ptuning PTUNING_DIR] [--config CONFIG_JSON] [--overwrite]
    glm-convert to-torch SRC DST [--format safetensors|bin] [--max-shard-size 5GB] [--layout FAMILY]
                                 [--dtype ...] [--ptuning-only] [--overwrite]

to-jax SRC: an HF checkpoint folder of any family (config.json + model.safetensors / pytorch_model.bin, single
or sharded with an index json), or a THUDM/GLM Megatron folder of mp_rank_XX_model_states.pt files (its GLM
config.json beside them, or --config). --ptuning adds a P-Tuning v2 prefix checkpoint on top of SRC.
--mesh chunks the stored arrays as the shards of that mesh (the glm_jax.sharding rules) and records it.
to-torch SRC: a to-jax folder or a glm-train run directory (latest complete step). Without --format /
--max-shard-size it writes back the layout the source had; --layout glm-hf exports a chatglm2-family model
as transformers' GlmForCausalLM; --ptuning-only writes just the prefix encoder, as the P-Tuning scripts do.

Exit codes: 0 done; 2 bad input (one `error:` line on stderr naming the file and the problem); 1 internal
error. The output is built in a hidden sibling of DST and renamed at the end, so a failed run leaves no DST
(and an existing DST, replaced only with --overwrite, is untouched until the new one is complete).
"""

from __future__ import annotations

import argparse
import gc
import os
import pathlib
import shutil
import sys
import time
import traceback
import warnings

DTYPES = ("float32", "bfloat16", "float16")


class BadInput(ValueError):
    """A bad argument or destination (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every other bad input
        raise BadInput(f"{self.prog}: {message}")


def _parser():
    p = _Parser(prog="glm-convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    j = sub.add_parser("to-jax", help="PyTorch / Megatron checkpoint → glm-jax folder")
    j.add_argument("src")
    j.add_argument("dst")
    j.add_argument("--dtype", choices=DTYPES, help="cast floating params (default: keep the source dtypes)")
    j.add_argument("--mesh", help="DATA,FSDP,TENSOR: chunk the stored params as this mesh's shards")
    j.add_argument("--ptuning", metavar="DIR", help="P-Tuning v2 prefix checkpoint to load on top of SRC")
    j.add_argument("--config", metavar="FILE", help="config.json for a Megatron checkpoint that has none beside it")
    j.add_argument("--overwrite", action="store_true")
    t = sub.add_parser("to-torch", help="glm-jax folder or glm-train run → PyTorch checkpoint folder")
    t.add_argument("src")
    t.add_argument("dst")
    t.add_argument("--format", choices=("safetensors", "bin"), help="default: the source's, else safetensors")
    t.add_argument("--max-shard-size", help="e.g. 5GB, 500MB, 2GiB (default: the source's shards, else 5GB)")
    t.add_argument("--layout", help="family layout to export to (glm, chatglm, chatglm2, glm-hf, glm4)")
    t.add_argument("--dtype", choices=DTYPES, help="cast floating tensors (default: the source's dtypes)")
    t.add_argument("--ptuning-only", action="store_true", help="write only transformer.prefix_encoder.*")
    t.add_argument("--overwrite", action="store_true")
    return p


def _mesh(text):
    if text is None:
        return None
    try:
        d, f, t = (int(x) for x in text.split(","))
        assert min(d, f, t) > 0
    except (ValueError, AssertionError):
        raise BadInput(f"--mesh {text!r}: expected three positive integers DATA,FSDP,TENSOR, e.g. 1,8,1") from None
    return {"data": d, "fsdp": f, "tensor": t}


def _quiet():
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.filterwarnings("ignore")
    try:
        from absl import logging as alog

        alog.set_verbosity(alog.FATAL)
    except ImportError:
        pass


def _reuse_freed_memory():
    """Keep freed tensor buffers in the heap (glibc: no mmap for large blocks, no trimming, one arena): each tensor
    then lands in pages the process already has, instead of new pages that the kernel must first reclaim from
    the page cache (which our own output keeps filling) — on the bench VM that doubled the conversion time."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: large blocks from the heap too
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: keep freed memory for the next tensor
        libc.mallopt(-8, 1)  # M_ARENA_MAX: one heap for all threads, so freed blocks are found again
    except (OSError, AttributeError):
        pass


class _Bar:
    """tqdm over bytes written, on stderr (only when stderr is a terminal)."""

    def __init__(self, desc):
        from tqdm import tqdm

        self.bar = tqdm(
            total=0,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=desc,
            disable=None,
            file=sys.stderr,
            leave=False,
            dynamic_ncols=True,
        )

    def total(self, n):
        self.bar.total = n
        self.bar.refresh()

    def __call__(self, n):
        self.bar.update(n)

    def close(self):
        self.bar.close()


def run(args) -> dict:
    from convert.torch_io import parse_size

    src, dst = pathlib.Path(args.src), pathlib.Path(args.dst)
    if not src.exists():
        raise BadInput(f"{src}: no such file or folder")
    if dst.exists() and not args.overwrite:
        raise BadInput(f"{dst}: already exists (pass --overwrite to replace it)")
    if dst.resolve() == src.resolve():
        raise BadInput(f"{dst}: is the source itself")
    if getattr(args, "max_shard_size", None):
        try:
            parse_size(args.max_shard_size)
        except ValueError as e:
            raise BadInput(f"--max-shard-size: {e}") from None
    mesh = _mesh(getattr(args, "mesh", None))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    bar = _Bar(args.command)
    try:
        if args.command == "to-jax":
            from convert.importer import to_jax

            out = to_jax(
                src,
                tmp,
                dtype=args.dtype,
                mesh=mesh,
                ptuning=args.ptuning,
                config=args.config,
                progress=bar,
                on_total=bar.total,
            )
        else:
            from convert.export import to_torch

            out = to_torch(
                src,
                tmp,
                fmt=args.format,
                max_shard=args.max_shard_size,
                layout=args.layout,
                dtype=args.dtype,
                ptuning_only=args.ptuning_only,
                progress=bar,
                on_total=bar.total,
            )
        bar.close()
        _replace(tmp, dst)
    except BaseException:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace(tmp: pathlib.Path, dst: pathlib.Path):
    old = None
    if dst.exists() or dst.is_symlink():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def main(argv=None) -> int:
    """The glm-convert command (argv: for calls from Python; the process-wide malloc tuning is left out then)."""
    _quiet()
    if argv is None:
        _reuse_freed_memory()
        # the imports (jax, orbax, tensorstore, torch) make ~1M objects and trip the cyclic collector hundreds
        # of times: 5.4 s of start-up, 3.5 s with a larger first threshold (measured); still collected.
        gc.set_threshold(50_000, 20, 100)
    from glm_jax.checkpoint import CheckpointFormatError
    from glm_jax.config import ConfigError

    t0 = time.time()
    try:
        args = _parser().parse_args(argv)
        out = run(args)
    except (BadInput, CheckpointFormatError, ConfigError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("GLM_CONVERT_DEBUG"):
            traceback.print_exc()
        print(
            f"error: internal error ({type(e).__name__}: {' '.join(str(e).split())}); "
            f"set GLM_CONVERT_DEBUG=1 for the traceback",
            file=sys.stderr,
        )
        return 1
    dt = time.time() - t0
    print(
        f"{args.command}: wrote {args.dst} ({out['tensors']} tensors, {out['bytes'] / 1e9:.3f} GB) in {dt:.1f} s "
        f"({out['bytes'] / 1e6 / max(dt, 1e-9):.0f} MB/s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
