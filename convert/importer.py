"""`glm-convert to-jax`: a PyTorch checkpoint folder → a glm-jax folder, one tensor at a time.

Sources: HF folders of every family (safetensors or .bin, single or sharded), Megatron `mp_rank_XX` folders
(config from a config.json beside them or `--config`), and a P-Tuning v2 prefix checkpoint on top of a base.
The family's key-map rows (glm_jax/families/) turn each HF tensor into params; `checkpoint.hf.iter_params` checks
missing, extra and mis-shaped keys. Source files are memory-mapped; the pages already used are handed back
to the kernel as the conversion goes, so resident memory stays near the tensors in flight.
"""

from __future__ import annotations

import base64
import ctypes
import os
import pathlib
import time
import types

import numpy as np

from convert import guard, jax_io, torch_io
from glm_jax import families
from glm_jax.checkpoint.files import find_weight_files, read_json_object, tensor_shape
from glm_jax.checkpoint.hf import check_config_against_checkpoint, config_from_folder, iter_params, open_weights
from glm_jax.checkpoint.megatron import MergedReader, pick_files
from glm_jax.checkpoint.orbax import flatten, unflatten
from glm_jax.config import GLMConfig
from glm_jax.errors import CheckpointFormatError, ConfigError
from glm_jax.families.rows import PREFIX
from glm_jax.quant.rows import quantized_shapes, source_key

DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
SHAPE_ONLY = np.dtype([])  # zero bytes per element: runs a row's transform for its shapes only, touching no data


class Source(types.SimpleNamespace):
    """cfg, config_file (the config.json it came from), fmt, files, index (path or None), readers {key: reader},
    where (text naming the weights)."""


def read_source(src, config=None, ptuning=None) -> Source:
    src = pathlib.Path(src)
    fmt, files, _ = find_weight_files(src)
    if fmt == "megatron":
        files = pick_files(files)  # the tag the tracker file names
    cfg, config_file = _source_config(src, fmt, files, config)
    _, readers = open_weights(src)
    index = src / torch_io.FILE_NAMES[fmt][2] if fmt in torch_io.FILE_NAMES else None
    index = index if index is not None and index.is_file() else None
    where = str(index or (files[0] if len(files) == 1 else src))
    s = Source(cfg=cfg, fmt=fmt, files=files, index=index, readers=readers, where=where, ptuning=None)
    s.config_file = str(config_file)
    if ptuning is not None:
        _add_ptuning(s, pathlib.Path(ptuning))
    return s


def _source_config(src, fmt, files, config) -> tuple[GLMConfig, pathlib.Path]:
    if config is None and fmt != "megatron":
        return config_from_folder(src), src / "config.json"
    if config is not None:
        where = pathlib.Path(config)
    else:
        where = next((d / "config.json" for d in (files[0].parent, src) if (d / "config.json").is_file()), None)
        if where is None:
            raise ConfigError(
                f"{src}: a Megatron checkpoint carries no config.json; put the model's GLM config.json "
                f"beside the mp_rank files or pass --config FILE"
            )
    d = read_json_object(where)
    if fmt == "megatron":  # the Megatron code computes GELU with the tanh approximation (gelu_impl in its mpu)
        d = {**d, "gelu_variant": d.get("gelu_variant", "gelu_tanh")}
    try:
        cfg = GLMConfig.from_hf(d)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if fmt == "megatron" and not families.get(cfg.family).reads_megatron:
        raise ConfigError(f"{where}: describes a {cfg.family} model, but Megatron mp_rank checkpoints are original GLM")
    return cfg, where


def _add_ptuning(s: Source, pdir: pathlib.Path):
    _, pfiles, _ = find_weight_files(pdir)
    _, preaders = open_weights(pdir)
    bad = [k for k in preaders if not k.startswith(PREFIX)]
    if bad:
        raise CheckpointFormatError(f"{pfiles[0]}: a P-Tuning v2 checkpoint holds only {PREFIX}* keys, found {bad[:3]}")
    emb = PREFIX + "embedding.weight"
    if emb not in preaders:
        raise CheckpointFormatError(f"{pfiles[0]}: no {emb!r}, so this is not a P-Tuning v2 prefix checkpoint")
    if not families.get(s.cfg.family).supports_ptuning:
        raise ConfigError(
            f"{pfiles[0]}: P-Tuning v2 prefixes belong to ChatGLM-6B and ChatGLM2/3 models "
            f"(chatglm, chatglm2 families), the base is {s.cfg.family}"
        )
    proj = any(k.startswith(PREFIX + "trans.") for k in preaders)
    base = s.cfg.hf_config or s.cfg.to_hf()
    s.cfg = GLMConfig.from_hf({**base, "pre_seq_len": int(preaders[emb].get(emb).shape[0]), "prefix_projection": proj})
    s.readers = {**{k: r for k, r in s.readers.items() if not k.startswith(PREFIX)}, **preaders}
    s.ptuning = {"path": str(pdir), "files": [f.name for f in pfiles], "keys": list(preaders)}


class _ShapeOnly:
    """A reader whose get(key) gives a zero-byte array of the tensor's shape (no data is read)."""

    def __init__(self, reader):
        self.reader = reader

    def shape(self, key):
        return tensor_shape(self.reader, key)

    def get(self, key):
        return np.empty(tensor_shape(self.reader, key), SHAPE_ONLY)


def shape_only(reader):
    if isinstance(reader, MergedReader):  # join the ranks' shapes, not their data
        return MergedReader([_ShapeOnly(r) for r in reader.ranks], reader.names)
    return _ShapeOnly(reader)


def tensor_info(reader, key) -> tuple[np.dtype, tuple]:
    """(dtype, shape) of a source tensor without reading its data."""
    first = reader.ranks[0].get(reader.names[key]) if isinstance(reader, MergedReader) else reader.get(key)
    return first.dtype, tuple(shape_only(reader).get(key).shape)


# ------------------------------------------------------------------ manifest
def build_manifest(s: Source) -> dict:
    """What to-torch needs to write the source back bit for bit (see convert/jax_io.py)."""
    files, order = [], []
    if s.fmt == "megatron":
        files = [{"name": str(f.relative_to(f.parents[1]) if f.parent != f.parents[1] else f.name)} for f in s.files]
        order = list(s.readers)
    else:
        by_path = {pathlib.Path(r.path): r for r in {id(r): r for r in s.readers.values()}.values()}
        for f in s.files:
            r = by_path[f]
            keys = [k for k in r.keys() if s.readers.get(k) is r]  # noqa: SIM118 - readers have keys()
            files.append({"name": f.name, "metadata": r.metadata or None, "keys": keys})
            order += keys
    seen = set(order)
    order += [k for k in s.readers if k not in seen]
    fam = families.get(s.cfg.family)
    consumed = {k for r in families.keymap(s.cfg) for k in r.hf}
    prefix = fam.optional_key_prefix
    if prefix:
        consumed |= {k[len(prefix) :] for k in consumed if k.startswith(prefix)}
    tensors, buffers = {}, {}
    for k in order:
        dt, shape = tensor_info(s.readers[k], k)
        tensors[k] = {"dtype": torch_io.st_name(dt), "shape": list(shape)}
        if k in consumed:
            continue
        a = s.readers[k].get(k)
        target = fam.tied_aliases.get(k)
        if target in s.readers and _same_bytes(a, s.readers[target].get(target)):
            buffers[k] = {"alias": target}
        else:
            buffers[k] = {"data": base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()}
    index = read_json_object(s.index) if s.index else None
    return {
        "format": s.fmt,
        "files": files,
        "index": index,
        "tensors": tensors,
        "buffers": buffers,
        "ptuning": s.ptuning,
    }


def _same_bytes(a, b, step=1 << 24) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    x, y = np.ascontiguousarray(a).reshape(-1).view(np.uint8), np.ascontiguousarray(b).reshape(-1).view(np.uint8)
    return all(np.array_equal(x[i : i + step], y[i : i + step]) for i in range(0, x.size, step))


# ------------------------------------------------------------------ params, one row at a time
class _RowStream:
    """Hands out iter_params' arrays in order; the Orbax writer pulls them one at a time."""

    def __init__(self, gen, cast, release):
        self.gen, self.cast, self.release = gen, cast, release
        self.head = next(gen)  # the key checks of iter_params run here, before anything is written
        self.since_release = 0

    def fetch(self, path):
        guard.check_stop()
        if self.head is None:
            self.head = next(self.gen)
        p, a = self.head
        self.head = None
        if p != path:
            raise RuntimeError(f"internal: params written out of order ({path} requested, {p} produced)")
        a = self.cast(a)
        self.since_release += a.nbytes
        if self.since_release > (256 << 20):
            self.release()
            self.since_release = 0
        return a


def lazy_params(s: Source, dtype=None, mesh=None, release=lambda: None) -> tuple[dict, int]:
    """A params tree of jax_io.Lazy leaves (per-layer layout) that read and transform the source on demand."""
    import jax.numpy as jnp

    from glm_jax.model.transformer import param_shapes

    cfg = s.cfg.replace(scan_layers=False)
    rows = families.keymap(cfg)
    target = torch_io.np_dtype(DTYPES[dtype]) if dtype else None
    cast = (
        (lambda a: a.astype(target) if a.dtype != target and jnp.issubdtype(a.dtype, jnp.floating) else a)
        if target is not None
        else (lambda a: a)
    )
    stream = _RowStream(iter_params(cfg, s.readers, s.where, config_file=s.config_file), cast, release)
    shapes, chunks = {}, {}
    flatten(quantized_shapes(param_shapes(cfg), cfg, rows), "", shapes)
    if mesh:
        chunks = mesh_chunks(cfg, shapes, mesh)
    names = {k: k for k in s.readers}
    prefix = families.get(cfg.family).optional_key_prefix
    if prefix:  # keys stored without the family's prefix (Megatron naming)
        names.update({prefix + k: k for k in s.readers if not k.startswith(prefix)})
    flat, total = {}, 0
    for r in rows:
        for p in r.jax:
            key = names[source_key(r, p)]  # a quantized row's scales keep the .weight_scale's dtype
            dt = cast(np.zeros((), tensor_info(s.readers[key], key)[0])).dtype
            flat[p] = jax_io.Lazy(
                shapes[p].shape, dt, (lambda p=p: stream.fetch(p)), order=len(flat), chunk=chunks.get(p)
            )
            total += flat[p].nbytes
    return unflatten(flat), total


def mesh_chunks(cfg, shapes: dict, mesh: dict) -> dict:
    """On-disk chunk = the shard each device holds on this (data, fsdp, tensor) mesh, by the sharding rules."""
    from glm_jax.model.transformer import param_axes
    from glm_jax.sharding import logical_to_spec

    axes = {}
    flatten(param_axes(cfg), "", axes)
    fake = types.SimpleNamespace(shape=dict(mesh))
    out = {}
    for p, s in shapes.items():
        spec = logical_to_spec(axes.get(p, (None,) * len(s.shape)), s.shape, fake)  # kernel_scale: unsplit
        sizes = [int(np.prod([mesh[a] for a in ((ax,) if isinstance(ax, str) else ax)])) if ax else 1 for ax in spec]
        out[p] = tuple(d // n for d, n in zip(s.shape, list(sizes) + [1] * (len(s.shape) - len(sizes))))
    return out


def page_releaser(files):
    """A function that drops this process's mapped pages of `files` (clean file pages; re-read if touched)."""
    paths = {os.path.realpath(f) for f in files}
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return lambda: None

    def release():
        try:
            with open("/proc/self/maps") as fh:
                lines = fh.read().splitlines()
        except OSError:
            return
        for line in lines:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5] in paths:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                madvise(lo, hi - lo, 4)  # MADV_DONTNEED

    return release


def validate(s: Source):
    """Every check of iter_params (missing, extra, mis-shaped keys) on zero-byte stand-ins, before writing."""
    readers = {k: shape_only(r) for k, r in s.readers.items()}
    for _ in iter_params(s.cfg.replace(scan_layers=False), readers, s.where, config_file=s.config_file):
        guard.check_stop()


def to_jax(src, dst, *, dtype=None, mesh=None, ptuning=None, config=None, progress=None, on_total=None) -> dict:
    t0 = time.time()
    s = read_source(src, config=config, ptuning=ptuning)
    # the config's sizes against the headers first: nothing below expands or allocates per layer before this
    check_config_against_checkpoint(s.cfg, s.readers, s.where, s.config_file)
    validate(s)
    guard.check_stop()
    manifest = build_manifest(s)
    files = list(s.files) + ([pathlib.Path(ptuning) / f for f in s.ptuning["files"]] if s.ptuning else [])
    release = page_releaser(files)
    release()
    params, total = lazy_params(s, dtype=dtype, mesh=mesh, release=release)
    if on_total:
        on_total(total)
    cfg = s.cfg.replace(param_dtype=dtype) if dtype else s.cfg
    mesh_meta = dict(mesh) if mesh else None
    jax_io.save_jax(dst, cfg, params, manifest, mesh=mesh_meta, progress=progress)
    release()
    guard.check_stop()
    torch_io.copy_aux_files(pathlib.Path(src), pathlib.Path(dst))
    return {"tensors": len(manifest["tensors"]), "bytes": total, "seconds": time.time() - t0}
