"""glm-jax checkpoint folders (written by `glm-convert to-jax`) and glm-train run directories, one tensor at a time.

A to-jax folder:
    glm_jax.json   {"format": "glm-jax", "version": 1, "config": GLMConfig.to_dict(), "source": manifest, "mesh": ...}
                   The manifest describes the PyTorch checkpoint it came from (format, files, key order, dtypes,
                   shapes, index, safetensors __metadata__, non-parameter buffers as base64) so that
                   `to-torch` can write it back bit for bit.
    config.json    cfg.to_hf()
    params/        Orbax PyTree checkpoint of the params, per-layer `layers_{i}` layout, numpy leaves.
    ...            tokenizer and generation files copied from the source.
A glm-train run directory: `<run>/checkpoints/<step>/` is an Orbax CheckpointManager step with items `params`
(stacked under `layers` when the config has scan_layers) and `meta` ({"step", "config": GLMConfig.to_dict()}).
A LoRA run's params also hold the adapter under `lora/` and its meta an "adapter" entry: its store reads the
weights merged (glm_jax/adapters.py MergedStore), so every reader sees the trained model; on a quantized base, the
float model it trained (glm_jax/quant/store.py).

`OrbaxStore` reads params back one tensor (or one layer of a stacked tensor) at a time; the writers are in
glm-convert (convert/jax_io.py) and glm-train.
"""

from __future__ import annotations

import contextlib
import json
import pathlib

import numpy as np

from glm_jax import storage
from glm_jax.checkpoint import layout
from glm_jax.checkpoint.store import ParamStore
from glm_jax.config import GLMConfig
from glm_jax.errors import CheckpointFormatError, ConfigError
from glm_jax.quant.store import DequantizedStore, float_config

JSON_NAME = "glm_jax.json"
FORMAT = "glm-jax"


@contextlib.contextmanager
def quiet_absl():
    """Orbax logs routine warnings through absl; keep them off stderr while we call it."""
    from absl import logging as alog

    old = alog.get_verbosity()
    alog.set_verbosity(alog.FATAL)
    try:
        yield
    finally:
        alog.set_verbosity(old)


class OrbaxStore:
    """A ParamStore (glm_jax/checkpoint/store.py) over an Orbax PyTree checkpoint directory: one leaf, or one
    layer of a stacked leaf, at a time through tensorstore, with no full restore."""

    def __init__(self, directory):
        import orbax.checkpoint as ocp

        self.dir = storage.epath_of(directory)
        try:
            with quiet_absl():
                md = ocp.PyTreeCheckpointer().metadata(self.dir).item_metadata
        except Exception as e:
            raise CheckpointFormatError(f"{directory}: not a readable Orbax params checkpoint ({e})") from None
        self.use_zarr3 = bool(md.use_zarr3)
        self.leaves = {}
        flatten(md.tree, "", self.leaves)
        self.stacks = layout.stored_stacks(self.leaves)
        self._open = {}

    def paths(self):
        return list(self.leaves)

    def shape(self, path):
        name, idx = self.locate(path)
        s = tuple(self.leaves[name].shape)
        return s if idx is None else s[1:]

    def dtype(self, path) -> np.dtype:
        return np.dtype(self.leaves[self.locate(path)[0]].dtype)

    def locate(self, path):
        name, idx = layout.locate(path, self.stacks)
        if name not in self.leaves:
            raise CheckpointFormatError(f"{self.dir}: params checkpoint has no tensor {path!r}")
        return name, idx

    def read(self, path) -> np.ndarray:
        return self.read_async(path).result()

    def read_rows(self, path, start, stop) -> np.ndarray:
        """Rows [start, stop) of the first axis only."""
        name, idx = self.locate(path)
        t = self._store(name)
        t = t if idx is None else t[idx]
        return np.asarray(t[start : min(stop, t.shape[0])].read().result())

    def read_async(self, path):
        """A tensorstore future of the array (so the next read can overlap with other work)."""
        name, idx = self.locate(path)
        t = self._store(name)
        return (t if idx is None else t[idx]).read()

    def _store(self, name):
        if name not in self._open:
            import tensorstore as ts
            from orbax.checkpoint._src.path import format_utils
            from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
            from orbax.checkpoint._src.serialization import types as ser_types

            ocdbt = format_utils.is_ocdbt_checkpoint(self.dir)
            info = ser_types.ParamInfo(
                name=self.leaves[name].name,
                parent_dir=self.dir,
                is_ocdbt_checkpoint=ocdbt,
                use_zarr3=self.use_zarr3,
                ts_context=self._context(ocdbt),
            )
            spec = ts_utils.build_array_read_spec(info, use_ocdbt=ocdbt).json
            self._open[name] = ts.open(spec, read=True, context=info.ts_context).result()
        return self._open[name]

    def _context(self, ocdbt):
        if not hasattr(self, "_ctx"):
            import tensorstore as ts
            from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

            # chunk files are mapped, not read(): no copy into freshly allocated buffers (~4x faster reads)
            self._ctx = ts.Context(
                ts.Context.Spec({"file_io_mode": {"mode": "memmap"}}), parent=ts_utils.get_ts_context(use_ocdbt=ocdbt)
            )
        return self._ctx


def flatten(tree, prefix, out):
    for k, v in tree.items():
        p = f"{prefix}{k}"
        if isinstance(v, dict):
            flatten(v, p + "/", out)
        else:
            out[p] = v


def unflatten(flat):
    tree = {}
    for p, v in flat.items():
        *head, last = p.split("/")
        node = tree
        for h in head:
            node = node.setdefault(h, {})
        node[last] = v
    return tree


def is_jax_checkpoint(p: pathlib.Path) -> bool:
    """A to-jax folder, a glm-train run directory, or one step of a run (rather than a PyTorch folder)."""
    p = storage.as_path(p)
    return (
        (p / JSON_NAME).is_file() or (p / "checkpoints").is_dir() or ((p / "params").is_dir() and (p / "meta").is_dir())
    )


class JaxCheckpoint:
    """An opened to-jax folder or glm-train step: config, source manifest (None for glm-train), params store."""

    def __init__(self, cfg, manifest, store: ParamStore, aux_dir=None, description=""):
        self.cfg, self.manifest, self.store, self.aux_dir, self.description = cfg, manifest, store, aux_dir, description
        self.adapter = None  # a glm-train run's adapter entry of its meta ({"kind": "lora" | "ptuning", ...})


def open_jax(path) -> JaxCheckpoint:
    """Open a to-jax folder, a glm-train run directory (its latest complete step), or one step directory."""
    p = storage.as_path(path)
    storage.check_complete(p)
    if (p / JSON_NAME).is_file():
        try:
            meta = json.loads((p / JSON_NAME).read_text())
            cfg = GLMConfig.from_dict(meta["config"])
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, ConfigError) as e:
            raise ConfigError(f"{p / JSON_NAME}: not a valid glm-jax description ({e})") from None
        return JaxCheckpoint(cfg, meta.get("source"), OrbaxStore(p / "params"), p, str(p))
    step = _step_dir(p)
    meta = _read_meta(step)
    try:
        cfg = GLMConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ConfigError) as e:
        raise ConfigError(f"{step / 'meta'}: needs {{'config': GLMConfig.to_dict()}} ({e!r})") from None
    store = OrbaxStore(step / "params")
    adapter = meta.get("adapter")
    if isinstance(adapter, dict) and adapter.get("kind") == "lora":  # read merged (glm_jax/adapters.py)
        from glm_jax.adapters import MergedStore

        if cfg.quantization_bit:  # LoRA trained on a quantized base: the float model it trained
            store, cfg = DequantizedStore(store, cfg.quantization_bit), float_config(cfg)
        try:
            store = MergedStore(store, cfg, adapter, str(step))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointFormatError(f"{step}: its LoRA adapter does not load ({e!r})") from None
    ck = JaxCheckpoint(cfg, None, store, None, str(step))
    ck.adapter = adapter
    return ck


def _step_dir(p: pathlib.Path) -> pathlib.Path:
    if (p / "params").is_dir() and (p / "meta").is_dir():
        return p
    ck = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    if not ck.is_dir() or not any(c.name.isdigit() for c in ck.iterdir()):
        raise CheckpointFormatError(
            f"{p}: neither a to-jax folder ({JSON_NAME} missing) nor a glm-train run directory (checkpoints/<step>/)"
        )
    # glm-train writes <step>/glm_manifest.json last, once the step is complete: the newest such step wins; a run
    # written before manifests existed has none, and Orbax's latest committed step is taken
    steps = sorted((int(c.name), c) for c in ck.iterdir() if c.name.isdigit() and c.is_dir())
    complete = [c for _, c in steps if (c / "glm_manifest.json").is_file()]
    if complete:
        return complete[-1]
    import orbax.checkpoint as ocp

    with quiet_absl():
        try:
            step = ocp.CheckpointManager(
                storage.epath_of(ck), options=ocp.CheckpointManagerOptions(read_only=True)
            ).latest_step()
        except Exception:
            step = None
    if step is None:
        raise CheckpointFormatError(f"{ck}: no complete checkpoint step (an interrupted save leaves none)")
    return ck / str(step)


def _read_meta(step: pathlib.Path) -> dict:
    import orbax.checkpoint as ocp

    try:
        with quiet_absl():
            meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(storage.epath_of(step / "meta"))
    except Exception as e:
        raise CheckpointFormatError(f"{step / 'meta'}: cannot read the step's meta item ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointFormatError(f"{step / 'meta'}: expected a JSON object")
    return meta


def load_jax(path) -> tuple[GLMConfig, dict]:
    """(GLMConfig, params with numpy leaves) from a to-jax folder or a glm-train run directory."""
    ck = open_jax(path)
    reads = {p: ck.store.read_async(p) for p in ck.store.paths()}
    params = unflatten({p: np.asarray(f.result()) for p, f in reads.items()})
    if not ck.cfg.scan_layers:
        params = layout.unstack(params)
    return ck.cfg, params
