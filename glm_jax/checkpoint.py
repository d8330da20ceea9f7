"""Reading Hugging Face / PyTorch checkpoints one tensor at a time, and mapping them onto params.

Formats: `model.safetensors`, sharded `*.safetensors` + `model.safetensors.index.json`, `pytorch_model.bin`,
sharded `*.bin` + `pytorch_model.bin.index.json`, and Megatron `mp_rank_XX_model_states.pt` (read via
`torch.load(weights_only=True)`). safetensors files are memory-mapped; torch files are loaded with mmap=True.
"""
from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

from glm_jax.config import ConfigError, GLMConfig


class CheckpointFormatError(ValueError):
    """A checkpoint file that is missing, corrupt, or does not fit the model its config describes."""


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
              "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def read_config(path) -> dict:
    f = pathlib.Path(path) / "config.json"
    if not f.is_file():
        raise ConfigError(f"{f}: no config.json in this folder")
    try:
        d = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{f}: expected a JSON object, got {type(d).__name__}")
    return d


class SafetensorsFile:
    """Minimal memory-mapped safetensors reader (exact bytes, bfloat16 via ml_dtypes)."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointFormatError(f"{self.path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointFormatError(f"{self.path}: corrupt safetensors header length {n}")
            try:
                header = json.loads(fh.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointFormatError(f"{self.path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.header = header
        self.offset = 8 + n
        for k, h in header.items():
            end = h["data_offsets"][1]
            if self.offset + end > size:
                raise CheckpointFormatError(f"{self.path}: truncated: tensor {k!r} ends at byte {self.offset + end}, "
                                            f"file has {size}")
            if h["dtype"] not in _ST_DTYPES:
                raise CheckpointFormatError(f"{self.path}: tensor {k!r} has unsupported dtype {h['dtype']}")
        self._mm = None

    def keys(self):
        return list(self.header)

    def get(self, key) -> np.ndarray:
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        h = self.header[key]
        a, b = h["data_offsets"]
        raw = self._mm[self.offset + a:self.offset + b]
        return raw.view(_ST_DTYPES[h["dtype"]]).reshape(h["shape"])


class TorchFile:
    """A torch pickle read with weights_only=True (never runs code) and mmap where the format allows."""

    def __init__(self, path, subkey=None):
        import torch
        self.path = pathlib.Path(path)
        try:
            try:
                sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                sd = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
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
        self.sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        self.metadata = {}

    def keys(self):
        return list(self.sd)

    def get(self, key) -> np.ndarray:
        import torch
        t = self.sd[key].detach()
        if t.dtype == torch.bfloat16:
            return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.contiguous().numpy()


def find_weight_files(path) -> tuple[str, list[pathlib.Path], dict]:
    """(format, files, key→file map). format is 'safetensors', 'bin' or 'megatron'."""
    p = pathlib.Path(path)
    if not p.is_dir():
        raise CheckpointFormatError(f"{p}: not a checkpoint folder")
    for fmt, index_name, single in (("safetensors", "model.safetensors.index.json", "model.safetensors"),
                                    ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin")):
        idx = p / index_name
        if idx.is_file():
            try:
                wm = json.loads(idx.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise CheckpointFormatError(f"{idx}: not a valid index (needs a weight_map object): {e!r}") from None
            files = sorted(set(wm.values()))
            for f in files:
                if not (p / f).is_file():
                    raise CheckpointFormatError(f"{idx}: names shard {f!r}, which is missing from {p}")
            return fmt, [p / f for f in files], dict(wm)
        if (p / single).is_file():
            return fmt, [p / single], {}
    mp = sorted(p.glob("mp_rank_*_model_states.pt")) or sorted(p.glob("*/mp_rank_*_model_states.pt"))
    if mp:
        return "megatron", mp, {}
    raise CheckpointFormatError(f"{p}: no weights found (expected model.safetensors, pytorch_model.bin, an index json, "
                                f"or mp_rank_XX_model_states.pt)")


def open_weights(path):
    """(format, {key: reader}) for a folder; each reader has .get(key)."""
    fmt, files, _ = find_weight_files(path)
    if fmt == "megatron":
        from convert.megatron import open_megatron
        return fmt, open_megatron(files)
    readers = {}
    for f in files:
        r = SafetensorsFile(f) if fmt == "safetensors" else TorchFile(f)
        for k in r.keys():
            readers[k] = r
    return fmt, readers


def _set(tree, path, value):
    parts = path.split("/")
    for p in parts[:-1]:
        tree = tree.setdefault(p, {})
    tree[parts[-1]] = value


def _get(tree, path):
    for p in path.split("/"):
        tree = tree[p]
    return tree


def iter_params(cfg: GLMConfig, readers: dict, source: str = "", layout=None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (param path, array) one row at a time; checks missing, extra and mis-shaped keys."""
    from convert.formats import BUFFER_SUFFIXES, keymap
    from glm_jax.model.transformer import param_shapes, unstack_layers
    rows = keymap(cfg, layout)
    names = {k: k for k in readers}
    if (layout or cfg.family) == "glm" and not any(k.startswith("glm.") for k in readers):
        names = {"glm." + k: k for k in readers}   # Megatron naming: no "glm." prefix
        readers = {"glm." + k: r for k, r in readers.items()}
    keys = set(readers)
    wanted = {k for r in rows for k in r.hf}
    missing = sorted(wanted - keys)
    if missing:
        raise CheckpointFormatError(f"{source}: missing {len(missing)} key(s) that a {cfg.family} model with this "
                                    f"config.json needs, e.g. {missing[:3]}")
    ignorable = set(BUFFER_SUFFIXES)
    extra = sorted(k for k in keys - wanted if not k.endswith(tuple(ignorable)) and not _tied_alias(cfg, k))
    if extra:
        raise CheckpointFormatError(f"{source}: {len(extra)} unexpected key(s) for a {cfg.family} model with this "
                                    f"config.json, e.g. {extra[:3]}")
    shapes = unstack_layers(param_shapes(cfg.replace(scan_layers=False)))
    for r in rows:
        arrays = []
        for k in r.hf:
            try:
                arrays.append(readers[k].get(names[k]))
            except CheckpointFormatError:
                raise
            except Exception as e:  # noqa: BLE001
                raise CheckpointFormatError(f"{source}: cannot read tensor {k!r}: {e}") from None
        try:
            outs = r.load(cfg, arrays)
        except ValueError as e:
            raise CheckpointFormatError(f"{source}: tensor(s) {list(r.hf)} have shapes {[a.shape for a in arrays]} "
                                        f"that do not fit the config: {e}") from None
        for path, a in zip(r.jax, outs):
            want = _get(shapes, path).shape
            if tuple(a.shape) != tuple(want):
                raise CheckpointFormatError(f"{source}: tensor {r.hf[0]!r} gives {path} of shape {tuple(a.shape)}, "
                                            f"but config.json implies {tuple(want)}")
            yield path, a


def _tied_alias(cfg, key):
    return cfg.family == "chatglm" and cfg.tie_word_embeddings and key == "lm_head.weight"


def load_params(cfg: GLMConfig, path, layout=None) -> dict:
    """Params tree (numpy leaves, per-layer `layers_{i}` layout) from an HF checkpoint folder."""
    fmt, readers = open_weights(path)
    tree: dict = {}
    for p, a in iter_params(cfg, readers, str(path), layout):
        _set(tree, p, a)
    return tree


def config_from_folder(path) -> GLMConfig:
    d = read_config(path)
    try:
        return GLMConfig.from_hf(d)
    except ConfigError as e:
        raise ConfigError(f"{pathlib.Path(path) / 'config.json'}: {e}") from None


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
