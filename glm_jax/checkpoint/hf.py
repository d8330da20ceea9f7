"""Hugging Face / PyTorch checkpoint folders -> params, one key-map row at a time.

Every family's key map (glm_jax/families/) pairs the checkpoint's keys with param paths; `iter_params` checks
missing, extra and mis-shaped keys against the config before it yields anything else. Before any of that,
`check_config_against_checkpoint` compares the config's sizes with the tensors' headers (layer count from the
keys, vocabulary and hidden size from the embedding's shape, other widths against the largest tensor), so a
config.json that lies (num_layers=10**9 beside a 2-layer checkpoint) is refused before anything is expanded or
allocated for each of its layers.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np

from glm_jax import families, storage
from glm_jax.checkpoint.files import SafetensorsFile, TorchFile, find_weight_files, read_config, tensor_shape
from glm_jax.checkpoint.megatron import open_megatron
from glm_jax.config import GLMConfig
from glm_jax.errors import CheckpointFormatError, ConfigError
from glm_jax.quant.rows import quantized_shapes


def config_from_folder(path) -> GLMConfig:
    """The GLMConfig of a checkpoint folder's config.json (ConfigError naming the file when it is bad)."""
    d = read_config(path)
    try:
        cfg = GLMConfig.from_hf(d)
    except ConfigError as e:
        raise ConfigError(f"{storage.as_path(path) / 'config.json'}: {e}") from None
    fit = families.get(cfg.family).fit_to_checkpoint
    if fit is not None:
        try:
            keys = list(open_weights(path)[1])
        except (CheckpointFormatError, OSError):
            return cfg  # the loader names the problem
        cfg = fit(cfg, keys)
    return cfg


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


_SHAPE_ONLY = np.dtype([])  # zero bytes per element: a row's transform run for its shapes only


def _layer_pattern(fam) -> re.Pattern:
    """A regex matching the family's per-layer checkpoint keys; the layer index is its one matched group."""
    alts = []
    for i, k in enumerate(sorted({k for r in fam.rows if r.per_layer for k in r.hf})):
        before, after = k.split("{l}", 1)
        after = re.escape(after).replace(re.escape("{e}"), "\\d+")  # one key per routed expert
        alts.append(f"(?:{re.escape(before)}(?P<l{i}>\\d+){after})")
    return re.compile("|".join(alts) or "(?!)")


def _layer_index(m: re.Match) -> int:
    return int(next(v for v in m.groupdict().values() if v is not None))


def check_config_against_checkpoint(cfg, readers: dict, source: str = "", config_file="config.json", layout=None):
    """Refuse (CheckpointFormatError naming config_file and the mismatch) a config whose sizes the tensors on disk
    cannot have: a layer count other than the layer indices the keys hold, an embedding other than
    (vocab_size, hidden_size), or a width larger than any tensor. Reads headers only; costs one pass over the
    keys, whatever the config claims."""
    fam = families.get(layout or cfg.family)
    prefix = fam.optional_key_prefix
    pattern = _layer_pattern(fam)
    layers = set()
    for k in readers:
        m = pattern.fullmatch(k) or (pattern.fullmatch(prefix + k) if prefix else None)
        if m is not None:
            layers.add(_layer_index(m))
    n = cfg.num_layers + cfg.num_mtp_layers  # MTP layers are stored after the last one
    if len(layers) != n or (layers and (min(layers), max(layers)) != (0, n - 1)):
        held = f"layers {min(layers)}..{max(layers)} ({len(layers)} distinct)" if layers else "no layer keys"
        raise CheckpointFormatError(
            f"{config_file}: says num_layers={cfg.num_layers}, but the checkpoint {source} holds {held}"
        )
    largest = 0
    for k, r in readers.items():
        shape = tensor_shape(r, k)
        n = 1
        for d in shape:
            n *= d
        largest = max(largest, n)
    widths = {"ffn_size": cfg.ffn_size, "num_heads*head_dim": cfg.num_heads * cfg.head_dim}
    widths["num_kv_heads*head_dim"] = cfg.num_kv_heads * cfg.head_dim
    if cfg.position_encoding == "learned":
        widths["max_position_embeddings"] = cfg.max_position_embeddings
    if cfg.pre_seq_len:
        widths.update(pre_seq_len=cfg.pre_seq_len, prefix_hidden_size=cfg.prefix_hidden_size)
        widths["prefix_embed_size"] = cfg.prefix_embed_size
    for name, v in widths.items():
        if v > largest:
            raise CheckpointFormatError(
                f"{config_file}: says {name}={v}, more than any tensor of the checkpoint {source} holds "
                f"(the largest has {largest} values)"
            )
    _check_embedding(cfg, fam, readers, source, config_file, prefix)


def _check_embedding(cfg, fam, readers, source, config_file, prefix):
    row = next((r for r in fam.rows if not r.per_layer and "embed/embedding" in r.jax and r.when(cfg)), None)
    if row is None:
        return
    names = {k: k for k in readers} | ({prefix + k: k for k in readers} if prefix else {})
    if not all(k in names for k in row.hf):
        return  # the missing-key check names it
    shapes = [tensor_shape(readers[names[k]], names[k]) for k in row.hf]
    want = (cfg.vocab_size, cfg.hidden_size)
    try:
        got = tuple(row.load(cfg, [np.empty(s, _SHAPE_ONLY) for s in shapes])[row.jax.index("embed/embedding")].shape)
    except ValueError:
        got = None
    if got != want:
        raise CheckpointFormatError(
            f"{config_file}: says vocab_size={cfg.vocab_size} and hidden_size={cfg.hidden_size}, but the checkpoint "
            f"{source} holds {row.hf[0]!r} of shape {shapes[0]} (expected {want})"
        )


def _set(tree, path, value):
    parts = path.split("/")
    for p in parts[:-1]:
        tree = tree.setdefault(p, {})
    tree[parts[-1]] = value


def _get(tree, path):
    for p in path.split("/"):
        tree = tree[p]
    return tree


def iter_params(
    cfg, readers: dict, source: str = "", layout=None, config_file="config.json"
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (param path, array) one row at a time; checks the config's sizes against the headers, then missing,
    extra and mis-shaped keys, first."""
    from glm_jax.model.transformer import param_shapes

    check_config_against_checkpoint(cfg, readers, source, config_file, layout)
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
    shapes = quantized_shapes(param_shapes(cfg.replace(scan_layers=False)), cfg, rows)
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
    for p, a in iter_params(cfg, readers, str(path), layout, str(storage.as_path(path) / "config.json")):
        _set(tree, p, a)
    return tree
