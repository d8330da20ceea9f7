"""THUDM/GLM Megatron checkpoints: `<dir>/[<tag>/]mp_rank_XX_model_states.pt`, merged across model-parallel ranks.

Each file is a torch pickle {'module': state dict without the `glm.` prefix, 'iteration', optimizer and RNG
states, ...}, read with `weights_only=True` (plus numpy RNG states and argparse.Namespace, which the Megatron
and DeepSpeed savers put beside the weights; nothing else that could run code). When several tags are saved,
`latest_checkpointed_iteration.txt` (Megatron) or `latest` (DeepSpeed) names the one to read.

With model-parallel size m > 1 (THUDM/GLM's mpu layers): word embeddings and `dense_h_to_4h` (weight and
bias) are split by rows, `attention.dense` and `dense_4h_to_h` weights by columns, and each rank's
`query_key_value` holds [Q_r; K_r; V_r] (its slice of Q, of K and of V); everything else is replicated.
Merging is lazy: `get(key)` reads and joins that key's slices only.

Megatron checkpoints carry no config.json: `glm-convert to-jax` takes it from a config.json beside the files,
or from `--config FILE` (a GLM config.json).
"""

from __future__ import annotations

import contextlib
import pathlib
import re

import numpy as np

from glm_jax.checkpoint.files import TorchFile
from glm_jax.errors import CheckpointFormatError

_ROWS = ("word_embeddings.weight", "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias")
_COLS = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")
_QKV = ("attention.query_key_value.weight", "attention.query_key_value.bias")
TRACKERS = ("latest_checkpointed_iteration.txt", "latest")


def pick_files(files) -> list:
    """The mp_rank files of one checkpoint tag, in rank order (the tracker file picks among several tags)."""
    files = [pathlib.Path(f) for f in files]
    by_dir = {}
    for f in files:
        by_dir.setdefault(f.parent, []).append(f)
    if len(by_dir) > 1:
        root = files[0].parent.parent
        tracker = next((root / t for t in TRACKERS if (root / t).is_file()), None)
        if tracker is None:
            raise CheckpointFormatError(
                f"{root}: holds several checkpoints ({', '.join(sorted(d.name for d in by_dir))}) "
                f"and no {TRACKERS[0]} or {TRACKERS[1]} to say which; pass the tag folder"
            )
        tag = tracker.read_text().strip()
        names = [tag] + ([f"iter_{int(tag):07d}"] if tag.isdigit() else [])
        chosen = next((root / n for n in names if root / n in by_dir), None)
        if chosen is None:
            raise CheckpointFormatError(f"{tracker}: names {tag!r}, but {root} has no such checkpoint folder")
        files = by_dir[chosen]
    ranks = sorted(files, key=lambda f: int(re.search(r"mp_rank_(\d+)", f.name).group(1)))
    got = [int(re.search(r"mp_rank_(\d+)", f.name).group(1)) for f in ranks]
    if got != list(range(len(ranks))):
        raise CheckpointFormatError(f"{ranks[0].parent}: model-parallel ranks {got} are not 0..{len(ranks) - 1}")
    return ranks


@contextlib.contextmanager
def _megatron_globals():
    """Let weights_only=True read the numpy RNG state and argparse.Namespace saved beside the weights."""
    import argparse
    import importlib

    import torch

    mu = importlib.import_module("numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray")
    allowed = [
        argparse.Namespace,
        np.ndarray,
        np.dtype,
        (mu._reconstruct, "numpy.core.multiarray._reconstruct"),
        (mu._reconstruct, "numpy._core.multiarray._reconstruct"),
    ]
    allowed += [getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", object)) if n.endswith("DType")]
    with torch.serialization.safe_globals(allowed):
        yield


class MergedReader:
    """One key of a model-parallel checkpoint, joined across ranks on demand."""

    def __init__(self, ranks: list, names: dict):
        self.ranks, self.names = ranks, names  # names: clean key → key in the files

    def keys(self):
        return list(self.names)

    def shape(self, key) -> tuple:
        """The merged tensor's shape, from the ranks' headers (nothing is read or joined)."""
        raw = self.names[key]
        shapes = [tuple(r.shape(raw)) for r in self.ranks]
        axis = 0 if key.endswith(_QKV + _ROWS) else 1 if key.endswith(_COLS) else None
        if len(shapes) == 1 or axis is None or len(shapes[0]) <= axis:
            return shapes[0]
        s = list(shapes[0])
        s[axis] = sum(x[axis] for x in shapes)
        return tuple(s)

    def get(self, key) -> np.ndarray:
        raw = self.names[key]
        parts = [r.get(raw) for r in self.ranks]
        if len(parts) == 1:
            return parts[0]
        if key.endswith(_QKV):
            thirds = [np.split(p, 3, axis=0) for p in parts]
            return np.concatenate([t[i] for i in range(3) for t in thirds], axis=0)
        if key.endswith(_ROWS):
            return np.concatenate(parts, axis=0)
        if key.endswith(_COLS):
            return np.concatenate(parts, axis=1)
        return parts[0]


def open_megatron(files) -> dict:
    """{key: reader with .get(key)} for a Megatron checkpoint; keys as in `module` (a DeepSpeed `module.`
    wrapper prefix is removed)."""
    ranks = []
    with _megatron_globals():
        for f in pick_files(files):
            ranks.append(TorchFile(f, subkey="module"))
    keys = ranks[0].keys()
    for r in ranks[1:]:
        if set(r.keys()) != set(keys):
            diff = sorted(set(r.keys()) ^ set(keys))[:3]
            raise CheckpointFormatError(f"{r.path}: its keys differ from {ranks[0].path}, e.g. {diff}")
    strip = "module." if keys and all(k.startswith("module.") for k in keys) else ""
    reader = MergedReader(ranks, {k[len(strip) :]: k for k in keys})
    return dict.fromkeys(reader.keys(), reader)
