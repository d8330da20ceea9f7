"""Hugging Face / PyTorch checkpoint folders -> params, one key-map row at a time.

Every family's key map (glm_jax/families/) pairs the checkpoint's keys with param paths; `iter_params` checks
missing, extra and mis-shaped keys against the config before it yields anything else.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import numpy as np

from glm_jax import families
from glm_jax.checkpoint.files import SafetensorsFile, TorchFile, find_weight_files, read_config
from glm_jax.checkpoint.megatron import open_megatron
from glm_jax.config import GLMConfig
from glm_jax.errors import CheckpointFormatError, ConfigError


def config_from_folder(path) -> GLMConfig:
    """The GLMConfig of a checkpoint folder's config.json (ConfigError naming the file when it is bad)."""
    d = read_config(path)
    try:
        return GLMConfig.from_hf(d)
    except ConfigError as e:
        raise ConfigError(f"{pathlib.Path(path) / 'config.json'}: {e}") from None


def open_weights(path):
    """(format, {key: reader}) for a folder; each reader has .get(key)."""
    fmt, files, _ = find_weight_files(path)
    if fmt == "megatron":
        return fmt, open_megatron(files)
    readers = {}
    for f in files:
        r = SafetensorsFile(f) if fmt == "safetensors" else TorchFile(f)
        for k in r.keys():  # noqa: SIM118 - readers have keys()
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


def iter_params(cfg, readers: dict, source: str = "", layout=None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (param path, array) one row at a time; checks missing, extra and mis-shaped keys first."""
    from glm_jax.model.transformer import param_shapes, unstack_layers

    fam = families.get(layout or cfg.family)
    rows = families.keymap(cfg, layout)
    names = {k: k for k in readers}
    prefix = fam.optional_key_prefix
    if prefix and not any(k.startswith(prefix) for k in readers):
        names = {prefix + k: k for k in readers}  # stored without the prefix (Megatron naming)
        readers = {prefix + k: r for k, r in readers.items()}
    keys = set(readers)
    wanted = {k for r in rows for k in r.hf}
    missing = sorted(wanted - keys)
    if missing:
        raise CheckpointFormatError(
            f"{source}: missing {len(missing)} key(s) that a {cfg.family} model with this "
            f"config.json needs, e.g. {missing[:3]}"
        )
    extra = sorted(k for k in keys - wanted if not k.endswith(fam.buffer_suffixes) and not fam.is_tied_alias(cfg, k))
    if extra:
        raise CheckpointFormatError(
            f"{source}: {len(extra)} unexpected key(s) for a {cfg.family} model with this config.json, e.g. {extra[:3]}"
        )
    shapes = unstack_layers(param_shapes(cfg.replace(scan_layers=False)))
    for r in rows:
        arrays = []
        for k in r.hf:
            try:
                arrays.append(readers[k].get(names[k]))
            except CheckpointFormatError:
                raise
            except Exception as e:
                raise CheckpointFormatError(f"{source}: cannot read tensor {k!r}: {e}") from None
        try:
            outs = r.load(cfg, arrays)
        except ValueError as e:
            raise CheckpointFormatError(
                f"{source}: tensor(s) {list(r.hf)} have shapes {[a.shape for a in arrays]} "
                f"that do not fit the config: {e}"
            ) from None
        for path, a in zip(r.jax, outs):
            want = _get(shapes, path).shape
            if tuple(a.shape) != tuple(want):
                raise CheckpointFormatError(
                    f"{source}: tensor {r.hf[0]!r} gives {path} of shape {tuple(a.shape)}, "
                    f"but config.json implies {tuple(want)}"
                )
            yield path, a


def load_params(cfg, path, layout=None) -> dict:
    """Params tree (numpy leaves, per-layer `layers_{i}` layout) from an HF checkpoint folder."""
    _, readers = open_weights(path)
    tree: dict = {}
    for p, a in iter_params(cfg, readers, str(path), layout):
        _set(tree, p, a)
    return tree
