"""Checkpoint files, read one tensor at a time: safetensors (memory-mapped), torch pickles (weights_only, mmap),
and the folder layouts that hold them (single files, sharded with an index json, Megatron mp_rank files).

Nothing here trusts a header: safetensors headers are checked the way the safetensors library checks them
(offsets in range, non-negative, contiguous, non-overlapping, and each tensor's byte count equal to its dtype
size times its shape), and an index may only name shard files inside the checkpoint folder.
"""

from __future__ import annotations

import io
import json
import math
import pathlib
import struct

import numpy as np

from glm_jax import storage
from glm_jax.dtypes import ST_DTYPES, torch_to_numpy
from glm_jax.errors import CheckpointFormatError, ConfigError

MAX_HEADER_BYTES = 100_000_000
INDEX_NAMES = {
    "safetensors": ("model.safetensors.index.json", "model.safetensors"),
    "bin": ("pytorch_model.bin.index.json", "pytorch_model.bin"),
}


def read_json_object(f: pathlib.Path, what: str = "") -> dict:
    """A JSON file that must hold an object; ConfigError naming the file otherwise."""
    with storage.errors(f):
        if not f.is_file():
            raise ConfigError(f"{f}: no {what or f.name} in this folder" if what else f"{f}: no such file")
        text = f.read_text()
    try:
        d = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{f}: expected a JSON object, got {type(d).__name__}")
    return d


def read_config(path) -> dict:
    return read_json_object(storage.as_path(path) / "config.json", "config.json")


def check_safetensors_header(header, data_bytes: int, where: str) -> None:
    """Raise CheckpointFormatError unless every entry of a parsed safetensors header is a valid tensor record."""
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{where}: safetensors header is a JSON {type(header).__name__}, not an object")
    spans = []
    for k, h in header.items():
        if k == "__metadata__":
            if h is not None and (not isinstance(h, dict) or not all(isinstance(v, str) for v in h.values())):
                raise CheckpointFormatError(f"{where}: __metadata__ must map strings to strings")
            continue
        if not isinstance(h, dict) or not {"dtype", "shape", "data_offsets"} <= set(h):
            raise CheckpointFormatError(f"{where}: tensor {k!r} needs dtype, shape and data_offsets, got {h!r}"[:300])
        dt, shape, off = h["dtype"], h["shape"], h["data_offsets"]
        if not isinstance(dt, str) or dt not in ST_DTYPES:
            raise CheckpointFormatError(f"{where}: tensor {k!r} has unsupported dtype {dt!r}")
        if not isinstance(shape, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
        ):
            raise CheckpointFormatError(f"{where}: tensor {k!r} has a bad shape {shape!r}")
        if (
            not isinstance(off, list)
            or len(off) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in off)
        ):
            raise CheckpointFormatError(f"{where}: tensor {k!r} has bad data_offsets {off!r}")
        a, b = off
        if a < 0 or b < a:
            raise CheckpointFormatError(f"{where}: tensor {k!r} has data_offsets {off} (negative or reversed)")
        if b > data_bytes:
            raise CheckpointFormatError(
                f"{where}: truncated: tensor {k!r} ends at data byte {b}, the file holds {data_bytes} bytes of data"
            )
        need = math.prod(shape) * np.dtype(ST_DTYPES[dt]).itemsize
        if b - a != need:
            raise CheckpointFormatError(
                f"{where}: tensor {k!r} is {dt}{shape} ({need} bytes) but its data_offsets span {b - a} bytes"
            )
        spans.append((a, b, k))
    spans.sort()
    end = 0
    for a, b, k in spans:
        if a != end:
            what = "overlaps the tensor before it" if a < end else f"leaves a gap at data byte {end}"
            raise CheckpointFormatError(f"{where}: tensor {k!r} at data_offsets [{a}, {b}] {what}")
        end = b
    if end != data_bytes:
        raise CheckpointFormatError(f"{where}: the tensors cover {end} bytes of data, the file holds {data_bytes}")


class SafetensorsFile:
    """Safetensors reader (exact bytes, bfloat16 via ml_dtypes) of a validated file: memory-mapped on a local disk;
    on gs://, the header and then each tensor are ranged reads, so no full copy of the file is ever made."""

    def __init__(self, path):
        self.path = storage.as_path(path)
        self.remote = storage.is_remote(self.path)
        size = storage.size(self.path)
        if size < 8:
            raise CheckpointFormatError(f"{self.path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", storage.read_range(self.path, 0, 8))
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise CheckpointFormatError(f"{self.path}: corrupt safetensors header length {n}")
        try:
            header = json.loads(storage.read_range(self.path, 8, 8 + n).decode("utf-8"))  # UTF-8 only, as safetensors
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise CheckpointFormatError(f"{self.path}: corrupt safetensors header ({e})") from None
        check_safetensors_header(header, size - 8 - n, str(self.path))
        self.metadata = header.pop("__metadata__", None) or {}
        self.header = header
        self.offset = 8 + n
        self._mm = None

    def keys(self):
        return list(self.header)

    def shape(self, key) -> tuple:
        return tuple(self.header[key]["shape"])

    def get(self, key) -> np.ndarray:
        h = self.header[key]
        a, b = h["data_offsets"]
        if self.remote:
            raw = np.frombuffer(storage.read_range(self.path, self.offset + a, self.offset + b), np.uint8)
            return raw.view(ST_DTYPES[h["dtype"]]).reshape(h["shape"])
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mm[self.offset + a : self.offset + b]
        return raw.view(ST_DTYPES[h["dtype"]]).reshape(h["shape"])


class TorchFile:
    """A torch pickle read with weights_only=True (never runs code) and mmap where the format allows."""

    def __init__(self, path, subkey=None):
        import torch

        self.path = storage.as_path(path)
        try:
            if storage.is_remote(self.path):  # a pickle has no ranged reads: it is read whole into memory
                sd = torch.load(io.BytesIO(storage.read_bytes(self.path)), map_location="cpu", weights_only=True)
            else:
                sd = _load_local(self.path)
        except storage.StorageError:
            raise
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "weights_only" in str(e) or "Unsupported global" in str(e):
                msg = "refused: the pickle references objects other than tensors (it could run code); " + msg
            raise CheckpointFormatError(f"{self.path}: cannot read torch checkpoint: {msg}") from None
        if subkey is not None:
            if not isinstance(sd, dict) or subkey not in sd:
                raise CheckpointFormatError(f"{self.path}: expected a dict with a {subkey!r} entry")
            sd = sd[subkey]
        if not isinstance(sd, dict):
            raise CheckpointFormatError(f"{self.path}: expected a state dict, got {type(sd).__name__}")
        odd = [k for k in sd if not isinstance(k, str)]
        if odd:
            raise CheckpointFormatError(f"{self.path}: state dict keys must be strings, found {odd[:3]!r}"[:300])
        self.sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        self.metadata = {}

    def keys(self):
        return list(self.sd)

    def shape(self, key) -> tuple:
        return tuple(self.sd[key].shape)

    def get(self, key) -> np.ndarray:
        return torch_to_numpy(self.sd[key])


def _load_local(path):
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def tensor_shape(reader, key) -> tuple:
    """A tensor's shape from its reader's header (no data read); readers without `shape` give get(key).shape."""
    if hasattr(reader, "shape"):
        return tuple(reader.shape(key))
    return tuple(reader.get(key).shape)


def _shard_inside(folder: pathlib.Path, index: pathlib.Path, name) -> pathlib.Path:
    """The shard file an index names, refused unless it is a plain file name in the checkpoint folder. The name is
    checked as written (no separators, no `..`, not absolute), not after following links: a Hugging Face cache
    snapshot's files are links into its blobs folder, and they are the folder's own files."""
    if not isinstance(name, str) or not name or pathlib.PurePath(name).is_absolute():
        raise CheckpointFormatError(f"{index}: names shard {name!r}, which is not a file name inside {folder}")
    if name in (".", "..") or pathlib.PurePath(name).name != name or "\x00" in name:
        raise CheckpointFormatError(
            f"{index}: names shard {name!r}, which is not a plain file name in {folder} (it may lie outside)"
        )
    return folder / name


def find_weight_files(path) -> tuple[str, list[pathlib.Path], dict]:
    """(format, files, key -> file map). format is 'safetensors', 'bin' or 'megatron'."""
    p = storage.as_path(path)
    storage.check_complete(p)
    with storage.errors(p):
        return _find_weight_files(p)


def _find_weight_files(p) -> tuple[str, list[pathlib.Path], dict]:
    if not p.is_dir():
        raise CheckpointFormatError(f"{p}: not a checkpoint folder")
    for fmt, (index_name, single) in INDEX_NAMES.items():
        idx = p / index_name
        if idx.is_file():
            try:
                wm = json.loads(idx.read_text())["weight_map"]
                if not isinstance(wm, dict):
                    raise TypeError(f"weight_map is a {type(wm).__name__}")
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise CheckpointFormatError(f"{idx}: not a valid index (needs a weight_map object): {e!r}") from None
            names = sorted({str(v) if isinstance(v, str) else repr(v) for v in wm.values()})
            for v in wm.values():
                _shard_inside(p, idx, v)
            for f in names:
                if not (p / f).is_file():
                    raise CheckpointFormatError(f"{idx}: names shard {f!r}, which is missing from {p}")
            return fmt, [p / f for f in names], dict(wm)
        if (p / single).is_file():
            return fmt, [p / single], {}
    mp = sorted(p.glob("mp_rank_*_model_states.pt")) or sorted(p.glob("*/mp_rank_*_model_states.pt"))
    if mp:
        return "megatron", mp, {}
    raise CheckpointFormatError(
        f"{p}: no weights found (expected model.safetensors, pytorch_model.bin, an index json, "
        f"or mp_rank_XX_model_states.pt)"
    )
