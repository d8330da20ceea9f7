"""Opening paths: every path glm-jax takes may be a local path or a `gs://bucket/path` URL (DESIGN §3.11).

Local paths stay `pathlib.Path`; `gs://` URLs become `etils.epath.Path` over gcsfs (the same backend Orbax uses),
so a reader written against the pathlib API (`/`, `is_file`, `iterdir`, `read_text`, `open`) serves both.
Checkpoint arrays on GCS go through TensorStore's own `gcs` kvstore driver (Orbax builds its specs).

- Credentials are Google's application-default credentials. `STORAGE_EMULATOR_HOST=http://HOST:PORT` points every
  client at an emulator: gcsfs reads it itself, TensorStore reads `TENSORSTORE_GCS_HTTP_URL` (set from it here when
  unset), and gcsfs then sends no credentials, as Google's own client libraries do for an emulator.
- Retries with backoff on 408/429/5xx and dropped connections are the libraries' own: gcsfs retries each request
  6 times (exponential backoff, up to 32 s: gcsfs.retry.retry_request) and TensorStore's `gcs_request_retries`
  context resource (32 tries, 1 s to 32 s). Nothing here adds another loop around them.
- GCS has no rename. A folder glm-jax writes there carries `WRITING_MARKER` from its first object to its last:
  `begin_folder` writes it before anything else, `commit_folder` deletes it after everything else, and
  `check_complete` refuses a folder that still has it (an interrupted writer left it half-written).
- Every failure of the store (missing bucket or object, permission denied, retries exhausted) is a
  `glm_jax.errors.StorageError` naming the URL: the command-line tools turn it into one `error:` line, exit 2.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import threading

from glm_jax.errors import StorageError

SCHEME = "gs://"
WRITING_MARKER = ".glm-jax-writing"
_configured = threading.Lock()
_done: list = []


def is_remote(path) -> bool:
    return isinstance(path, str | os.PathLike) and os.fspath(path).startswith(SCHEME)


def configure():
    """Point TensorStore at the emulator too, and make gcsfs the `gs://` filesystem (idempotent; called before
    the first remote access, never at import time)."""
    with _configured:
        if _done:
            return
        emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
        if emulator:
            url = emulator if emulator.startswith(("http://", "https://")) else f"http://{emulator}"
            os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
        import fsspec
        import gcsfs.core

        # gcsfs's default class (ExtendedGcsFileSystem) first asks the Storage Control gRPC API for each bucket's
        # layout, for zonal and hierarchical buckets; glm-jax uses none of their features, and an emulator does
        # not serve that API, so every first access would wait out its retries. The plain JSON-API class serves
        # every bucket. epath asks fsspec for "gcs", others for "gs".
        # No listings cache: checkpoint arrays are written by TensorStore, not through gcsfs, so a cached listing
        # would hide a step's files (or its manifest) from the checks that read them back.
        for proto in ("gs", "gcs"):
            fsspec.register_implementation(proto, gcsfs.core.GCSFileSystem, clobber=True)
            fsspec.config.conf.setdefault(proto, {}).setdefault("use_listings_cache", False)
            if emulator:
                fsspec.config.conf.setdefault(proto, {}).setdefault("token", "anon")
        _done.append(True)


def as_path(path):
    """pathlib.Path for a local path, etils.epath.Path for a gs:// URL (never a local folder named `gs:`)."""
    if is_remote(path):
        configure()
        from etils import epath

        return epath.Path(os.fspath(path))
    return pathlib.Path(path)


def epath_of(path):
    """An absolute etils.epath.Path, what Orbax takes, for either kind of path."""
    from etils import epath

    if is_remote(path):
        configure()
        return epath.Path(os.fspath(path))
    return epath.Path(pathlib.Path(path).absolute())


def filesystem():
    """The gcsfs filesystem behind gs:// paths (the instance epath uses too)."""
    configure()
    import fsspec

    return fsspec.filesystem("gcs")


def _key(path) -> str:
    return os.fspath(path)[len(SCHEME) :]


@contextlib.contextmanager
def errors(path, doing="read"):
    """Map the store's failures inside the block to StorageError naming `path` (local paths pass through)."""
    if not is_remote(path):
        yield
        return
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as e:
        raise StorageError(f"no such object or bucket (cannot {doing} it)", os.fspath(path)) from e
    except PermissionError as e:
        raise StorageError(f"permission denied (cannot {doing} it)", os.fspath(path)) from e
    except Exception as e:
        text = " ".join(str(e).split()) or type(e).__name__
        if "Forbidden" in text or "403" in text:
            raise StorageError(f"permission denied (cannot {doing} it): {text[:200]}", os.fspath(path)) from e
        if _is_store_error(e):
            raise StorageError(f"cannot {doing} it: {text[:200]}", os.fspath(path)) from e
        raise


def _is_store_error(e) -> bool:
    import aiohttp
    from gcsfs.retry import HttpError

    return isinstance(e, OSError | HttpError | aiohttp.ClientError | TimeoutError)


def exists(path) -> bool:
    with errors(path):
        return as_path(path).exists()


def isdir(path) -> bool:
    with errors(path):
        return as_path(path).is_dir()


def listdir(path) -> list[str]:
    """Names in a folder, sorted."""
    with errors(path, "list"):
        return sorted(p.name for p in as_path(path).iterdir())


def open_file(path, mode="rb"):
    with errors(path, "write" if any(c in mode for c in "wax") else "read"):
        return as_path(path).open(mode)


def read_bytes(path) -> bytes:
    with errors(path):
        return as_path(path).read_bytes()


def read_text(path) -> str:
    with errors(path):
        return as_path(path).read_text()


def write_bytes(path, data: bytes):
    with errors(path, "write"):
        as_path(path).write_bytes(data)


def write_text(path, text: str):
    with errors(path, "write"):
        as_path(path).write_text(text)


def size(path) -> int:
    with errors(path):
        if is_remote(path):
            return int(filesystem().size(_key(path)))
        return pathlib.Path(path).stat().st_size


def read_range(path, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file: one ranged GET on GCS, no copy of the rest."""
    with errors(path):
        if is_remote(path):
            data = filesystem().cat_file(_key(path), start=start, end=end)
        else:
            with open(path, "rb") as fh:
                fh.seek(start)
                data = fh.read(end - start)
    if len(data) != end - start:
        raise StorageError(f"short read: bytes [{start}, {end}) gave {len(data)}", os.fspath(path))
    return data


def rmtree(path):
    """Delete a folder and everything in it (no error when it is absent)."""
    with errors(path, "delete"):
        if is_remote(path):
            fs = filesystem()
            if fs.exists(_key(path)):
                fs.rm(_key(path), recursive=True)
        else:
            shutil.rmtree(path, ignore_errors=True)


def download_folder(src, dst: pathlib.Path, names=None):
    """Copy a gs:// folder (or only `names` in it) into the local folder dst."""
    with errors(src):
        fs = filesystem()
        dst.mkdir(parents=True, exist_ok=True)
        if names is None:
            fs.get(_key(src).rstrip("/") + "/", os.fspath(dst), recursive=True)
        else:
            for n in names:
                fs.get(_key(src).rstrip("/") + "/" + n, os.fspath(dst / n))


def upload_folder(src: pathlib.Path, dst):
    """Copy the local folder src into gs:// dst as a committed folder: the writing marker first, every file, then
    the marker removed last. A failure leaves the marker (check_complete refuses the folder)."""
    with errors(dst, "write"):
        fs = filesystem()
        base = _key(dst).rstrip("/")
        begin_folder(dst)
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            fs.put_file(os.fspath(f), f"{base}/{f.relative_to(src).as_posix()}")
        commit_folder(dst)


def copy(src, dst):
    """Copy one file; either side may be local or gs://."""
    if is_remote(src) or is_remote(dst):
        write_bytes(dst, read_bytes(src)) if is_remote(dst) else pathlib.Path(dst).write_bytes(read_bytes(src))
    else:
        shutil.copyfile(src, dst)


def begin_folder(path):
    write_text(as_path(path) / WRITING_MARKER, f"pid {os.getpid()}\n")


def commit_folder(path):
    with errors(path, "write"):
        (as_path(path) / WRITING_MARKER).unlink()


def check_complete(path):
    """StorageError when a gs:// folder was left half-written (its writer never committed it)."""
    if is_remote(path) and exists(as_path(path) / WRITING_MARKER):
        raise StorageError(
            "half-written: an interrupted writer left it incomplete (delete it, or rerun with --overwrite)",
            os.fspath(path),
        )


def list_files(path) -> dict[str, int]:
    """{relative posix path: size} of every file under a folder (empty when the folder is absent). On GCS, one
    listing request (gcsfs find), not a walk of pseudo-folders."""
    with errors(path, "list"):
        if is_remote(path):
            base = _key(path).rstrip("/")
            fs = filesystem()
            found = fs.find(base, detail=True)
            return {
                k[len(base) + 1 :]: int(v.get("size") or 0)
                for k, v in found.items()
                if k.startswith(base + "/") and v.get("type") != "directory"
            }
        root = pathlib.Path(path)
        out = {}
        for dirpath, _, names in os.walk(root):
            for n in names:
                p = pathlib.Path(dirpath) / n
                out[p.relative_to(root).as_posix()] = p.stat().st_size
        return out


def subfolders(path) -> list[str]:
    """Names of the folders directly inside a folder, sorted (empty when it is absent)."""
    with errors(path, "list"):
        if is_remote(path):
            fs = filesystem()
            base = _key(path).rstrip("/")
            if not fs.exists(base):
                return []
            return sorted(
                e["name"].rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(base, detail=True) if e["type"] == "directory"
            )
        p = pathlib.Path(path)
        return sorted(c.name for c in p.iterdir() if c.is_dir()) if p.is_dir() else []


def delete(path):
    """Delete one file (no error when it is absent)."""
    with errors(path, "delete"):
        if is_remote(path):
            fs = filesystem()
            if fs.exists(_key(path)):
                fs.rm_file(_key(path))
        else:
            pathlib.Path(path).unlink(missing_ok=True)


def copy_folder(src, dst):
    """Server-side copy of a gs:// folder to another gs:// name (GCS's rewrite: no bytes pass through here)."""
    with errors(dst, "write"):
        filesystem().copy(_key(src).rstrip("/") + "/", _key(dst).rstrip("/") + "/", recursive=True)
