"""Streaming writers for PyTorch checkpoint files: safetensors and torch.save zip archives (`.bin`).

A writer is given every tensor's (key, dtype, shape) up front, writes the header, then asks `produce(key)` for
one tensor at a time and writes it before asking for the next, so memory stays at about one tensor. The bytes
follow what the reference libraries write: the safetensors library's header (its dtype-then-name order, space
padding to 8 bytes) and torch.save's archive (the same pickle, records and 64-byte alignment), so the files load
with `safetensors` / `torch.load(weights_only=True, mmap=True)` and transformers.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import pathlib
import pickle
import struct
import warnings
from collections.abc import Callable

import numpy as np

from convert import direct
from glm_jax.dtypes import ST_DTYPES, np_dtype, st_name, torch_dtype  # noqa: F401 - one table of dtype names

# The safetensors library sorts tensors by dtype (this order, largest first), then by name.
_ST_RANK = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "F16", "BF16", "I32", "F32", "F64", "I64")
_UNITS = {
    "TIB": 2**40,
    "GIB": 2**30,
    "MIB": 2**20,
    "KIB": 2**10,
    "TB": 10**12,
    "GB": 10**9,
    "MB": 10**6,
    "KB": 10**3,
    "B": 1,
}
FILE_NAMES = {
    "safetensors": ("model.safetensors", "model-{i:05d}-of-{n:05d}.safetensors", "model.safetensors.index.json"),
    "bin": ("pytorch_model.bin", "pytorch_model-{i:05d}-of-{n:05d}.bin", "pytorch_model.bin.index.json"),
}


@dataclasses.dataclass(frozen=True)
class Entry:
    key: str
    dtype: str  # safetensors dtype name ("F32", "BF16", ...)
    shape: tuple

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * np.dtype(ST_DTYPES[self.dtype]).itemsize


def parse_size(text) -> int:
    """'5GB' → 5·10⁹, '2GiB' → 2·2³⁰, '500MB', '1000' (bytes), '8Gb' (bits), as transformers' max_shard_size."""
    raw = str(text).strip()
    s = raw.upper()
    for unit, mult in _UNITS.items():
        if s.endswith(unit) and s[: -len(unit)].strip():
            s, m = s[: -len(unit)].strip(), mult
            if raw.endswith("b") and len(unit) == 2:  # "Gb", "Mb", "Kb": bits
                m /= 8
            break
    else:
        m = 1
    try:
        n = int(float(s) * m)
    except ValueError:
        raise ValueError(f"cannot read size {text!r} (examples: 5GB, 500MB, 2GiB)") from None
    if n <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return n


def split_shards(entries: list, max_bytes: int) -> list:
    """huggingface_hub's split: fill shards in order; a tensor larger than the limit gets a shard of its own."""
    shards, cur, size = [], [], 0
    for e in entries:
        if e.nbytes > max_bytes:
            shards.append([e])
            continue
        if cur and size + e.nbytes > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += e.nbytes
    if cur:
        shards.append(cur)
    return shards


def shard_file_names(fmt: str, n: int) -> list:
    single, pattern, _ = FILE_NAMES[fmt]
    return [single] if n == 1 else [pattern.format(i=i + 1, n=n) for i in range(n)]


def index_json(fmt, files, metadata=None, recount=True) -> tuple[str, str]:
    """(file name, text) of the HF index for shards [(file name, [Entry])], as save_pretrained writes it.
    recount=False keeps the metadata's total_parameters (the same tensors as the source: its count stands, which
    leaves out buffers and layers the reference model does not hold, such as Glm4Moe's MTP layer)."""
    md = dict(metadata or {})
    md["total_size"] = sum(e.nbytes for _, es in files for e in es)
    if "total_parameters" in md and recount:
        md["total_parameters"] = sum(e.numel for _, es in files for e in es)
    wm = {e.key: name for name, es in files for e in es}
    return FILE_NAMES[fmt][2], json.dumps(
        {"metadata": md, "weight_map": dict(sorted(wm.items()))}, indent=2, sort_keys=True
    ) + "\n"


# ------------------------------------------------------------------ safetensors
def st_order(entries: list) -> list:
    """The order in which the safetensors library lays tensors out (and lists them in the header)."""
    return sorted(entries, key=lambda e: (-_ST_RANK.index(e.dtype), e.key))


def st_header(entries: list, metadata: dict | None) -> bytes:
    """8-byte length + JSON header (tensors in the given order, consecutive offsets), space-padded to 8 bytes."""
    head, off = {}, 0
    if metadata is not None:
        head["__metadata__"] = metadata
    for e in entries:
        head[e.key] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [off, off + e.nbytes]}
        off += e.nbytes
    text = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


BIG = 256 << 20  # tensors at least this large are never in memory together with another one


class _Behind:
    """Runs one write in a background thread while the caller produces the next tensor (two tensors at most)."""

    def __init__(self):
        import concurrent.futures

        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="glm-convert-write")
        self.last = None

    def __call__(self, nbytes, fn, *args):
        self.wait()
        self.last = self.pool.submit(fn, *args)
        if nbytes >= BIG:  # a very large tensor is not kept while the next one is made
            self.wait()

    def before(self, nbytes):
        """Call before making a tensor: a very large one is not made while another is still being written."""
        if nbytes >= BIG:
            self.wait()

    def wait(self):
        if self.last is not None:
            last, self.last = self.last, None
            last.result()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            if exc[0] is None:
                self.wait()
        finally:
            self.pool.shutdown(wait=True)


def production_order(fmt: str, entries: list) -> list:
    """The order tensors are computed in: largest first for safetensors (written in place at their offsets), so
    the biggest buffers are allocated first and later ones reuse them; file order for .bin (a sequential zip)."""
    return sorted(entries, key=lambda e: -e.nbytes) if fmt == "safetensors" else list(entries)


def write_safetensors(path, entries: list, metadata: dict | None, produce: Callable):
    head = st_header(entries, metadata)
    offsets, off = {}, len(head)
    for e in entries:
        offsets[e.key], off = off, off + e.nbytes
    with direct.File(path, off) as f, _Behind() as behind:
        f.write(0, head)
        for e in production_order("safetensors", entries):
            behind.before(e.nbytes)
            behind(e.nbytes, f.write, offsets[e.key], _bytes(produce(e.key), e))


# ------------------------------------------------------------------ torch.save archive
_CPU = "cpu"  # one string object, so the pickle memoises it as torch.save's does
_STORAGE = "storage"


class _StorageRef:
    def __init__(self, key, entry):
        import torch

        self.key, self.numel = key, entry.numel
        tdt = torch_dtype(entry.dtype)
        name = torch.storage._dtype_to_storage_type_map().get(tdt)
        if name is None:
            raise ValueError(
                f"tensor {entry.key!r}: dtype {entry.dtype} cannot be written to a .bin file; use --format safetensors"
            )
        self.storage_type = getattr(torch, name)


class _TensorRef:
    """Pickles exactly as a contiguous torch.Tensor does (torch._utils._rebuild_tensor_v2)."""

    def __init__(self, storage, shape):
        self.storage, self.shape = storage, tuple(list(shape))  # a tuple of its own, as tensor.size() gives

    def __reduce_ex__(self, proto):
        import torch

        stride = tuple(int(np.prod(self.shape[i + 1 :])) for i in range(len(self.shape)))
        return (
            torch._utils._rebuild_tensor_v2,
            (self.storage, 0, self.shape, stride, False, collections.OrderedDict()),
        )


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return (_STORAGE, obj.storage_type, obj.key, _CPU, obj.numel)
        return None


def bin_pickle(entries: list) -> bytes:
    """data.pkl of torch.save({key: tensor}) for contiguous tensors with storage keys '0', '1', ... in order."""
    import io

    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump({e.key: _TensorRef(_StorageRef(str(i), e), e.shape) for i, e in enumerate(entries)})
    return buf.getvalue()


def write_bin(path, entries: list, produce: Callable):
    import torch
    from torch.serialization import _get_storage_alignment, get_crc32_options

    pkl = bin_pickle(entries)
    path = str(path)
    try:
        path.encode("ascii")
        stream, target = None, path
    except UnicodeEncodeError:
        stream = target = open(path, "wb")  # noqa: SIM115 - closed in the finally below
    w = torch._C.PyTorchFileWriter(target, get_crc32_options(), _get_storage_alignment())
    try:
        w.write_record("data.pkl", pkl, len(pkl))
        w.write_record(".format_version", "1", 1)
        align = str(_get_storage_alignment())
        w.write_record(".storage_alignment", align, len(align))
        w.write_record("byteorder", "little", len("little"))
        with _Behind() as behind:
            for i, e in enumerate(entries):
                behind.before(e.nbytes)
                raw = np.frombuffer(_bytes(produce(e.key), e), dtype=np.uint8)
                with warnings.catch_warnings():  # read-only source arrays: torch only reads them here
                    warnings.simplefilter("ignore", UserWarning)
                    storage = torch.from_numpy(raw).untyped_storage()
                behind(e.nbytes, w.write_record, f"data/{i}", storage, e.nbytes)
        w.write_end_of_file()
    finally:
        del w
        if stream is not None:
            stream.close()


def _bytes(a: np.ndarray, e: Entry) -> memoryview:
    if a.dtype != np_dtype(e.dtype) or tuple(a.shape) != tuple(e.shape):
        raise ValueError(f"tensor {e.key!r}: produced {a.dtype}{list(a.shape)}, planned {e.dtype}{list(e.shape)}")
    return memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def write_file(fmt: str, path, entries: list, metadata: dict | None, produce: Callable):
    if fmt == "safetensors":
        write_safetensors(path, entries, metadata, produce)
    else:
        write_bin(path, entries, produce)


_NOT_AUX = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json")
_NOT_AUX_NAMES = {"config.json", "glm_jax.json", "latest", "latest_checkpointed_iteration.txt"}


def copy_aux_files(src: pathlib.Path, dst: pathlib.Path, skip_code: bool = False) -> list:
    """Copy a checkpoint folder's other files (tokenizer, generation_config.json, remote code, ...) to dst."""
    import shutil

    copied = []
    for f in sorted(src.iterdir()) if src.is_dir() else []:
        if (
            not f.is_file()
            or f.name.startswith(".")
            or f.name in _NOT_AUX_NAMES
            or f.name.endswith(_NOT_AUX)
            or (skip_code and f.suffix == ".py")
        ):
            continue
        shutil.copyfile(f, dst / f.name)
        copied.append(f.name)
    return copied
