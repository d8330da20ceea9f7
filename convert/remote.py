"""glm-convert with gs:// paths: the same conversion, staged through a local temporary folder.

GCS has no rename, so the local guard (build in `.DST.tmp-PID`, rename at the end) cannot make a gs:// DST appear
whole. Instead the conversion runs locally, in full, first (remote inputs copied in beside it); only a complete
result is written to DST, as a committed folder (glm_jax/storage.py: the writing marker first, every file, the
marker removed last), so a reader never takes a half-written DST for a checkpoint. Any failure on the way removes
what was written of DST. The `--overwrite` and input-protection rules are the local ones, on URLs: DST may never
be an input or a folder holding one, an existing DST inside an input is never replaced, and an existing DST is
replaced only with --overwrite (it is kept until the new output is complete, then deleted and written anew).
"""

from __future__ import annotations

import contextlib
import copy
import pathlib
import shutil
import tempfile

from glm_jax import storage
from glm_jax.errors import CheckpointFormatError, ConfigError, StorageError


def _url(u: str) -> str:
    return u.rstrip("/")


def _protect(dst: str, inputs: list, overwrite: bool, bad_input):
    exists = storage.exists(dst)
    for name, p in inputs:
        if not storage.is_remote(p):
            continue
        p = _url(p)
        if dst == p:
            raise bad_input(f"{dst}: is the {name} itself; glm-convert never replaces its input")
        if p.startswith(dst + "/"):
            raise bad_input(f"{dst}: holds the {name} {p}; glm-convert never replaces a folder holding its input")
        if dst.startswith(p + "/") and exists:
            raise bad_input(f"{dst}: already exists inside the {name} {p}; glm-convert never replaces anything there")
    if exists and not overwrite:
        raise bad_input(f"{dst}: already exists (pass --overwrite to replace it)")


def _bucket(url: str) -> str:
    bucket = url[len(storage.SCHEME) :].split("/", 1)[0]
    with storage.errors(url):
        if not bucket or not storage.filesystem().exists(bucket):
            raise StorageError(f"no such bucket {bucket!r}", url)
    return bucket


def _stage_inputs(args, work: pathlib.Path, bad_input) -> dict:
    """Copy the remote inputs into work/; returns {local path: URL} for the error messages."""
    names = {}
    for opt, is_file in (("src", False), ("ptuning", False), ("config", True)):
        url = getattr(args, opt, None)
        if not storage.is_remote(url):
            continue
        url = _url(url)
        _bucket(url)
        if not storage.exists(url):
            raise bad_input(f"{url}: no such file or folder")
        storage.check_complete(url)
        local = work / f"in-{opt}"
        if is_file:
            storage.copy(url, local)
        else:
            storage.download_folder(url, local)
        setattr(args, opt, str(local))
        names[str(local)] = url
    return names


def run_remote(args, run_local, bad_input) -> dict:
    """run_local(args) with gs:// inputs staged and a gs:// DST uploaded; `bad_input`: the CLI's exit-2 error."""
    args = copy.copy(args)
    dst = _url(args.dst) if storage.is_remote(args.dst) else None
    if dst is not None:
        _bucket(dst)
        inputs = [("source", args.src)] + [(f"--{o} input", getattr(args, o, None)) for o in ("ptuning", "config")]
        _protect(dst, [(n, p) for n, p in inputs if p], args.overwrite, bad_input)
    with tempfile.TemporaryDirectory(prefix="glm-convert-") as tmp:
        work = pathlib.Path(tmp)
        names = {}
        try:
            names = _stage_inputs(args, work, bad_input)
            if dst is not None:
                args.dst = str(work / "out")
                args.overwrite = False
            out = run_local(args)
        except (bad_input, CheckpointFormatError, ConfigError) as e:
            text = str(e)
            for local, url in names.items():
                text = text.replace(local, url)
            raise type(e)(text) from None
        if dst is None:
            return out
        if storage.exists(dst):  # --overwrite (checked above): the old DST goes once the new one is complete
            storage.rmtree(dst)
        try:
            storage.upload_folder(work / "out", dst)
        except BaseException:
            with contextlib.suppress(StorageError):  # a store refusing deletes too keeps the marker, if written
                storage.rmtree(dst)
            raise
        finally:
            shutil.rmtree(work / "out", ignore_errors=True)
    return out
