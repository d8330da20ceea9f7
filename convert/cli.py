"""glm-convert: PyTorch checkpoints ↔ glm-jax, streamed one tensor at a time.

    glm-convert to-jax   SRC DST [--dtype float32|bfloat16|float16] [--mesh DATA,FSDP,TENSOR]
                                 [--ptuning PTUNING_DIR] [--config CONFIG_JSON] [--overwrite]
    glm-convert to-torch SRC DST [--format safetensors|bin] [--max-shard-size 5GB] [--layout FAMILY]
                                 [--dtype ...] [--ptuning-only] [--adapter] [--overwrite]
    glm-convert quantize SRC DST --bits 8|4 [--max-shard-size 5GB] [--overwrite]   (convert/quantize.py)

to-jax SRC: an HF checkpoint folder of any family (config.json + model.safetensors / pytorch_model.bin, single
or sharded with an index json), or a THUDM/GLM Megatron folder of mp_rank_XX_model_states.pt files (its GLM
config.json beside them, or --config). --ptuning adds a P-Tuning v2 prefix checkpoint on top of SRC.
--mesh chunks the stored arrays as the shards of that mesh (the glm_jax.sharding rules) and records it.
to-torch SRC: a to-jax folder or a glm-train run directory (latest complete step). Without --format /
--max-shard-size it writes back the layout the source had; --layout glm-hf exports a chatglm2-family model
as transformers' GlmForCausalLM; --ptuning-only writes just the prefix encoder, as the P-Tuning scripts do.
--adapter (a glm-train LoRA or P-Tuning run): only the adapter, as a PEFT adapter folder that peft loads onto the
base (LoRA) or as THUDM's prefix checkpoint (P-Tuning); without it a LoRA run exports merged full weights.

Exit codes: 0 done; 2 bad input (one `error:` line on stderr naming the file and the problem: a missing,
corrupt or lying checkpoint or config, a bad argument, a DST that cannot be written); 1 internal error;
128 + the signal's number (130 SIGINT, 143 SIGTERM) when interrupted, with one `error: interrupted` line.
The output is built in a hidden sibling of DST (`.DST.tmp-PID`) and renamed at the end, so a failed or
interrupted run leaves no DST (and an existing DST, replaced only with --overwrite, is untouched until the new
one is complete); a later run removes the temporary folders of killed runs and says so (convert/guard.py).
--overwrite replaces DST and nothing else: DST may never be SRC (or another input) or a folder holding it,
and an existing DST inside SRC is never replaced; a new DST inside SRC is allowed.
SRC, DST, --ptuning and --config may be gs:// URLs (convert/remote.py): a gs:// DST is written as a committed
folder (glm_jax/storage.py: a marker first, removed last), only once the conversion is complete.
"""

from __future__ import annotations

import argparse
import errno
import gc
import os
import pathlib
import shutil
import sys
import time
import traceback
import warnings

from convert import guard

DTYPES = ("float32", "bfloat16", "float16")
# errors of the destination's file system (a full disk, a read-only mount): bad input (the DST argument), exit 2
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


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
    t.add_argument("--adapter", action="store_true", help="a LoRA run: PEFT adapter folder; P-Tuning: the prefix")
    t.add_argument("--overwrite", action="store_true")
    q = sub.add_parser("quantize", help="ChatGLM / ChatGLM2 checkpoint → its int8 / int4 format (quantization_bit)")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("--bits", type=int, choices=(8, 4), required=True)
    q.add_argument("--max-shard-size", help="e.g. 5GB, 500MB, 2GiB (default 5GB)")
    q.add_argument("--overwrite", action="store_true")
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


def _protect(dst: pathlib.Path, inputs: list, overwrite: bool):
    """Refuse a DST whose replacement could touch an input: DST may not be an input (SRC, --ptuning, --config) or
    a folder that holds one, whatever --overwrite says; an existing DST inside an input is never replaced either
    (a DST inside SRC that does not exist yet is allowed: the new folder is only added there)."""
    here = dst.parent.resolve() / dst.name  # the path that would be replaced (a link itself, not its target)
    for name, p in inputs:
        pr = p.resolve()
        for d in {here, dst.resolve()}:
            if d == pr:
                raise BadInput(f"{dst}: is the {name} itself; glm-convert never replaces its input")
            if d in pr.parents:
                raise BadInput(f"{dst}: holds the {name} {p}; glm-convert never replaces a folder holding its input")
        if pr in here.parents and (dst.exists() or dst.is_symlink()):
            raise BadInput(f"{dst}: already exists inside the {name} {p}; glm-convert never replaces anything there")
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise BadInput(f"{dst}: already exists (pass --overwrite to replace it)")


def _check_args(args, dst: pathlib.Path) -> tuple[pathlib.Path, dict | None]:
    from convert.torch_io import parse_size

    src = pathlib.Path(args.src)
    if not src.exists():
        raise BadInput(f"{src}: no such file or folder")
    inputs = [("source", src)]
    for opt in ("ptuning", "config"):
        if getattr(args, opt, None):
            inputs.append((f"--{opt} input", pathlib.Path(getattr(args, opt))))
    _protect(dst, inputs, args.overwrite)
    if getattr(args, "max_shard_size", None):
        try:
            parse_size(args.max_shard_size)
        except ValueError as e:
            raise BadInput(f"--max-shard-size: {e}") from None
    return src, _mesh(getattr(args, "mesh", None))


def _convert(args, src, tmp, mesh, bar) -> dict:
    if args.command == "to-jax":
        from convert.importer import to_jax

        return to_jax(
            src,
            tmp,
            dtype=args.dtype,
            mesh=mesh,
            ptuning=args.ptuning,
            config=args.config,
            progress=bar,
            on_total=bar.total,
        )
    if args.command == "quantize":
        from convert.quantize import quantize_checkpoint

        return quantize_checkpoint(
            src, tmp, bits=args.bits, max_shard=args.max_shard_size, progress=bar, on_total=bar.total
        )
    from convert.export import to_torch

    return to_torch(
        src,
        tmp,
        fmt=args.format,
        max_shard=args.max_shard_size,
        layout=args.layout,
        dtype=args.dtype,
        ptuning_only=args.ptuning_only,
        adapter=args.adapter,
        progress=bar,
        on_total=bar.total,
    )


def run(args) -> dict:
    from glm_jax import storage

    if any(storage.is_remote(getattr(args, k, None)) for k in ("src", "dst", "ptuning", "config")):
        from convert.remote import run_remote

        return run_remote(args, _run_local, BadInput)
    return _run_local(args)


def _run_local(args) -> dict:
    dst = pathlib.Path(os.path.abspath(args.dst))  # "." and ".." get a name and a parent
    stale = guard.remove_stale(dst)  # first: a restored .old-PID is DST again for the checks
    if stale:
        print(f"glm-convert: cleared what a killed earlier run left: {'; '.join(stale)}", flush=True)
    src, mesh = _check_args(args, dst)
    try:
        created = guard.make_parents(dst.parent)
    except OSError as e:
        where = e.filename if e.filename is not None else dst.parent
        raise BadInput(f"{dst}: cannot create its folder {dst.parent} ({e.strerror}: {where})") from None
    tmp = guard.tmp_path(dst)
    bar = None
    try:
        with guard.SignalsStop(tmp):  # from before tmp exists until DST is in place
            try:
                tmp.mkdir()
            except OSError as e:
                raise BadInput(f"{dst}: cannot write in {dst.parent} ({e.strerror})") from None
            bar = _Bar(args.command)

            def work():
                return _convert(args, src, tmp, mesh, bar)

            out = guard.run_in_worker(work)
            bar.close()
            guard.check_stop()
            _replace(tmp, dst, args.overwrite)
    except BaseException:
        if bar is not None:
            bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        guard.remove_parents(created)
        raise
    return out


def _replace(tmp: pathlib.Path, dst: pathlib.Path, overwrite: bool):
    """Rename the finished tmp folder to dst; an existing dst (only with overwrite) is moved aside for the
    instant between the two renames, then deleted."""
    old = None
    if dst.exists() or dst.is_symlink():
        if not overwrite:  # created by someone else while we converted
            raise BadInput(f"{dst}: appeared while converting (pass --overwrite to replace it)")
        old = guard.old_path(dst)
        os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def _internal(e) -> int:
    if os.environ.get("GLM_CONVERT_DEBUG"):
        traceback.print_exception(e)
    print(
        f"error: internal error ({type(e).__name__}: {' '.join(str(e).split())}); "
        f"set GLM_CONVERT_DEBUG=1 for the traceback",
        file=sys.stderr,
    )
    return 1


def _interrupted(e: KeyboardInterrupt) -> int:
    """SIGINT (KeyboardInterrupt) or SIGTERM/SIGHUP (guard.SignalInterrupt) outside the conversion proper."""
    print("error: interrupted", file=sys.stderr)
    return 128 + getattr(e, "signum", 2)


def main(argv=None) -> int:
    """The glm-convert command (argv: for calls from Python; the process-wide malloc tuning is left out then)."""
    _quiet()
    if argv is None:
        guard.interrupt_on_signals()  # SIGTERM/SIGHUP as SIGINT until the conversion installs its own handlers
        _reuse_freed_memory()
        # the imports (jax, orbax, tensorstore, torch) make ~1M objects and trip the cyclic collector hundreds
        # of times: 5.4 s of start-up, 3.5 s with a larger first threshold (measured); still collected.
        gc.set_threshold(50_000, 20, 100)
    try:
        from glm_jax.errors import CheckpointFormatError, ConfigError, StorageError  # the import pulls in jax
    except KeyboardInterrupt as e:
        return _interrupted(e)

    t0 = time.time()
    args = None
    try:
        args = _parser().parse_args(argv)
        out = run(args)
    except (BadInput, CheckpointFormatError, ConfigError, StorageError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except guard.Interrupted as e:
        print("error: interrupted", file=sys.stderr)
        if argv is None:  # leave at once: no interpreter teardown while library threads may still exist
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(e.exit_code)
        return e.exit_code
    except KeyboardInterrupt as e:
        return _interrupted(e)
    except OSError as e:
        if e.filename is None and e.errno not in _WRITE_ERRNOS:
            return _internal(e)
        where = e.filename if e.filename is not None else getattr(args, "dst", "the destination")
        print(f"error: {where}: {e.strerror or e}", file=sys.stderr)
        return 2
    except Exception as e:
        return _internal(e)
    dt = time.time() - t0
    print(
        f"{args.command}: wrote {args.dst} ({out['tensors']} tensors, {out['bytes'] / 1e9:.3f} GB) in {dt:.1f} s "
        f"({out['bytes'] / 1e6 / max(dt, 1e-9):.0f} MB/s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
