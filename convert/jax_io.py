"""glm-jax checkpoint folders (written by `glm-convert to-jax`) and glm-train run directories.

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

Params are written one tensor at a time: the leaves of the tree given to `save_jax` may be `Lazy` (computed
when Orbax reaches them, in `order`), and at most two tensors are in memory at once. `ParamStore` reads them
back one tensor (or one layer of a stacked tensor) at a time.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import pathlib
import re
from typing import Callable, Optional

import numpy as np

from convert import direct
from glm_jax.checkpoint import CheckpointFormatError
from glm_jax.config import ConfigError, GLMConfig

JSON_NAME = "glm_jax.json"
CHUNK_BYTES = 16 << 20
RAW_MIN_BYTES = 1 << 20   # arrays at least this large: chunk files written by us through O_DIRECT, not by tensorstore
USE_OCDBT = False     # one zarr folder per leaf: measured faster than OCDBT for one-pass conversion
FORMAT = "glm-jax"
_TS_CONTEXT = {"file_io_concurrency": {"limit": 128}, "cache_pool#ocdbt": {"total_bytes_limit": 100_000_000},
               "file_io_sync": False}


class Lazy:
    """A params leaf whose array is computed by `fetch()` when it is written (in increasing `order`)."""

    def __init__(self, shape, dtype, fetch: Callable[[], np.ndarray], order: int = 0, chunk=None):
        self.shape, self.dtype, self.fetch, self.order = tuple(shape), np.dtype(dtype), fetch, order
        self.chunk = tuple(chunk) if chunk is not None else None   # on-disk chunk (write) shape
        self.ndim, self.size = len(self.shape), int(np.prod(self.shape))
        self.nbytes = self.size * self.dtype.itemsize


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


def _stream_handler(progress):
    from orbax.checkpoint._src.futures import future
    from orbax.checkpoint._src.serialization import ocdbt_utils
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
    from orbax.checkpoint._src.serialization import type_handlers
    import orbax.checkpoint as ocp
    import tensorstore as ts

    class StreamHandler(type_handlers.NumpyHandler):
        """Writes Lazy leaves one after another (the next is computed while the last one is written)."""

        async def serialize(self, values, infos, args=None):
            args = args or [ocp.SaveArgs()] * len(values)
            items = sorted(zip(values, infos, args), key=lambda t: t[0].order)
            return [future.CommitFutureAwaitingContractedSignals(self._stream(items), name="glm_jax_stream")]

        async def _stream(self, items):
            """Compute leaf i+1 in a worker thread while leaf i is written (the event loop stays free to drive
            tensorstore); at most two leaves are in memory."""
            import concurrent.futures
            ctx, loop = ts.Context(_TS_CONTEXT), asyncio.get_running_loop()
            with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="glm-convert-fetch") as ex:
                nxt = loop.run_in_executor(ex, items[0][0].fetch) if items else None
                try:
                    for i, (value, info, arg) in enumerate(items):
                        a = await nxt
                        nxt = loop.run_in_executor(ex, items[i + 1][0].fetch) if i + 1 < len(items) else None
                        if tuple(a.shape) != value.shape or a.dtype != value.dtype:
                            raise CheckpointFormatError(f"{info.name}: got {a.dtype}{list(a.shape)}, expected "
                                                        f"{value.dtype}{list(value.shape)}")
                        await self._write(a, value.chunk, info, arg, ctx)
                        del a
                finally:
                    if nxt is not None:
                        with contextlib.suppress(BaseException):
                            await nxt

        async def _write(self, a, chunk, info, arg, ctx):
            await info.await_path_creation()
            use_ocdbt = info.is_ocdbt_checkpoint
            spec = ts_utils.build_array_write_spec(
                info=info, arg=arg, global_shape=a.shape, local_shape=chunk or _chunk(a), dtype=a.dtype,
                use_ocdbt=use_ocdbt, process_index=ocdbt_utils.get_process_index_for_subdir(use_ocdbt=use_ocdbt)).json
            t = await ts.open(ts.Spec(spec), create=True, open=True, context=ctx)
            files = _raw_chunk_files(t, a)
            if files is not None:   # the chunk files tensorstore would write, through O_DIRECT (see direct.py)
                await asyncio.to_thread(_write_chunks, files, a, tuple(t.chunk_layout.write_chunk.shape))
            else:
                await t.write(a, can_reference_source_data_indefinitely=True)
            if progress is not None:
                progress(a.nbytes)

    return StreamHandler(deepcopy_host_arrays=False)


def _raw_chunk_files(t, a):
    """{chunk grid index: file path} when `t` is an uncompressed, unfiltered, C-order zarr v2 array in local files
    with the same dtype as `a` (each chunk file is then the chunk's raw bytes, padded to the full chunk shape);
    None otherwise, or for small arrays (tensorstore writes those)."""
    if a.nbytes < RAW_MIN_BYTES or a.ndim == 0:
        return None
    js = t.spec().to_json()
    md, kv = js.get("metadata", {}), js.get("kvstore", {})
    if (js.get("driver") != "zarr" or kv.get("driver") != "file" or md.get("compressor") is not None
            or md.get("filters") is not None or md.get("order", "C") != "C"
            or np.dtype(t.dtype.numpy_dtype) != a.dtype or a.dtype.byteorder == ">"):
        return None
    sep = md.get("dimension_separator", ".")
    chunks = tuple(md["chunks"])
    root = pathlib.Path(kv["path"])
    grid = [range(-(-n // c)) for n, c in zip(a.shape, chunks)]
    return {ix: root / sep.join(map(str, ix)) for ix in itertools.product(*grid)}


def _write_chunks(files, a, chunks):
    for ix, path in files.items():
        sl = tuple(slice(i * c, (i + 1) * c) for i, c in zip(ix, chunks))
        part = a[sl]
        if part.shape != chunks:                       # an edge chunk is stored at full size, padded with zeros
            full = np.zeros(chunks, a.dtype)
            full[tuple(slice(0, n) for n in part.shape)] = part
            part = full
        direct.write_whole(path, np.ascontiguousarray(part).reshape(-1).view(np.uint8))


def _chunk(a, limit=None):
    """On-disk chunk: whole rows of the first axis, at most `limit` (CHUNK_BYTES) bytes (reads and writes go chunk
    by chunk)."""
    limit = CHUNK_BYTES if limit is None else limit
    if a.ndim == 0 or a.nbytes <= limit:
        return a.shape
    row = a.nbytes // a.shape[0]
    return (max(1, limit // max(row, 1)),) + a.shape[1:]


def save_params(directory, params, progress=None):
    """Orbax PyTree checkpoint of `params` (leaves: Lazy or arrays), written one tensor at a time."""
    import jax
    import orbax.checkpoint as ocp
    order = iter(range(1 << 62))
    params = jax.tree.map(lambda x: x if isinstance(x, Lazy) else _eager(x, next(order)), params,
                          is_leaf=lambda x: isinstance(x, Lazy))
    with quiet_absl():
        registry = ocp.type_handlers.create_type_handler_registry((Lazy, _stream_handler(progress)))
        handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False,
                                              use_ocdbt=USE_OCDBT)
        ocp.Checkpointer(handler).save(pathlib.Path(directory).absolute(), args=ocp.args.PyTreeSave(params))


def _eager(x, order):
    a = np.asarray(x)
    return Lazy(a.shape, a.dtype, lambda: a, order=-(1 << 40) + order)


def save_jax(dst, cfg: GLMConfig, params, manifest: Optional[dict], *, mesh=None, progress=None):
    """Write a to-jax folder: params/ (streamed), glm_jax.json (config + source manifest), config.json."""
    dst = pathlib.Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    save_params(dst / "params", params, progress)
    meta = {"format": FORMAT, "version": 1, "config": cfg.to_dict(), "source": manifest, "mesh": mesh}
    (dst / JSON_NAME).write_text(json.dumps(meta, indent=1) + "\n")
    (dst / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------ reading
class ParamStore:
    """Reads one params leaf at a time from an Orbax PyTree checkpoint directory (tensorstore, no full restore).

    `read("layers_3/block/attn/q/kernel")` also works on a stacked (scan_layers) checkpoint, where it reads
    index 3 of `layers/block/attn/q/kernel` only."""

    def __init__(self, directory):
        import orbax.checkpoint as ocp
        from etils import epath
        self.dir = epath.Path(pathlib.Path(directory).absolute())
        try:
            with quiet_absl():
                md = ocp.PyTreeCheckpointer().metadata(self.dir).item_metadata
        except Exception as e:  # noqa: BLE001 - orbax raises many types for a broken folder
            raise CheckpointFormatError(f"{directory}: not a readable Orbax params checkpoint ({e})") from None
        self.use_zarr3 = bool(md.use_zarr3)
        self.leaves = {}
        _flatten(md.tree, "", self.leaves)
        self._open = {}

    def paths(self):
        return list(self.leaves)

    def shape(self, path):
        name, idx = self._locate(path)
        s = tuple(self.leaves[name].shape)
        return s if idx is None else s[1:]

    def dtype(self, path) -> np.dtype:
        return np.dtype(self.leaves[self._locate(path)[0]].dtype)

    def _locate(self, path):
        if path in self.leaves:
            return path, None
        m = re.match(r"layers_(\d+)/(.*)", path)
        if m and f"layers/{m.group(2)}" in self.leaves:
            return f"layers/{m.group(2)}", int(m.group(1))
        raise CheckpointFormatError(f"{self.dir}: params checkpoint has no tensor {path!r}")

    def read(self, path) -> np.ndarray:
        return self.read_async(path).result()

    def read_rows(self, path, start, stop) -> np.ndarray:
        """Rows [start, stop) of the first axis only."""
        name, idx = self._locate(path)
        t = self._store(name)
        t = t if idx is None else t[idx]
        return np.asarray(t[start:min(stop, t.shape[0])].read().result())

    def read_async(self, path):
        """A tensorstore future of the array (so the next read can overlap with other work)."""
        name, idx = self._locate(path)
        t = self._store(name)
        return (t if idx is None else t[idx]).read()

    def _store(self, name):
        if name not in self._open:
            import tensorstore as ts
            from orbax.checkpoint._src.path import format_utils
            from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
            from orbax.checkpoint._src.serialization import types as ser_types
            ocdbt = format_utils.is_ocdbt_checkpoint(self.dir)
            info = ser_types.ParamInfo(name=self.leaves[name].name, parent_dir=self.dir, is_ocdbt_checkpoint=ocdbt,
                                       use_zarr3=self.use_zarr3, ts_context=self._context(ocdbt))
            spec = ts_utils.build_array_read_spec(info, use_ocdbt=ocdbt).json
            self._open[name] = ts.open(spec, read=True, context=info.ts_context).result()
        return self._open[name]

    def _context(self, ocdbt):
        if not hasattr(self, "_ctx"):
            from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
            import tensorstore as ts
            # chunk files are mapped, not read(): no copy into freshly allocated buffers (~4x faster reads)
            self._ctx = ts.Context(ts.Context.Spec({"file_io_mode": {"mode": "memmap"}}),
                                   parent=ts_utils.get_ts_context(use_ocdbt=ocdbt))
        return self._ctx


def _flatten(tree, prefix, out):
    for k, v in tree.items():
        p = f"{prefix}{k}"
        if isinstance(v, dict):
            _flatten(v, p + "/", out)
        else:
            out[p] = v


def _unflatten(flat):
    tree = {}
    for p, v in flat.items():
        *head, last = p.split("/")
        node = tree
        for h in head:
            node = node.setdefault(h, {})
        node[last] = v
    return tree


class JaxCheckpoint:
    """An opened to-jax folder or glm-train step: config, source manifest (None for glm-train), params store."""

    def __init__(self, cfg, manifest, store: ParamStore, aux_dir=None, description=""):
        self.cfg, self.manifest, self.store, self.aux_dir, self.description = cfg, manifest, store, aux_dir, description


def open_jax(path) -> JaxCheckpoint:
    """Open a to-jax folder, a glm-train run directory (its latest complete step), or one step directory."""
    p = pathlib.Path(path)
    if (p / JSON_NAME).is_file():
        try:
            meta = json.loads((p / JSON_NAME).read_text())
            cfg = GLMConfig.from_dict(meta["config"])
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, ConfigError) as e:
            raise ConfigError(f"{p / JSON_NAME}: not a valid glm-jax description ({e})") from None
        return JaxCheckpoint(cfg, meta.get("source"), ParamStore(p / "params"), p, str(p))
    step = _step_dir(p)
    meta = _read_meta(step)
    try:
        cfg = GLMConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ConfigError) as e:
        raise ConfigError(f"{step / 'meta'}: needs {{'config': GLMConfig.to_dict()}} ({e!r})") from None
    return JaxCheckpoint(cfg, None, ParamStore(step / "params"), None, str(step))


def _step_dir(p: pathlib.Path) -> pathlib.Path:
    if (p / "params").is_dir() and (p / "meta").is_dir():
        return p
    ck = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    if not ck.is_dir() or not any(c.name.isdigit() for c in ck.iterdir()):
        raise CheckpointFormatError(f"{p}: neither a to-jax folder ({JSON_NAME} missing) nor a glm-train run "
                                    f"directory (checkpoints/<step>/)")
    import orbax.checkpoint as ocp
    with quiet_absl():
        try:
            step = ocp.CheckpointManager(ck.absolute(), options=ocp.CheckpointManagerOptions(read_only=True)).latest_step()
        except Exception:  # noqa: BLE001
            step = None
    if step is None:
        raise CheckpointFormatError(f"{ck}: no complete checkpoint step (an interrupted save leaves none)")
    return ck / str(step)


def _read_meta(step: pathlib.Path) -> dict:
    import orbax.checkpoint as ocp
    try:
        with quiet_absl():
            meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore((step / "meta").absolute())
    except Exception as e:  # noqa: BLE001
        raise CheckpointFormatError(f"{step / 'meta'}: cannot read the step's meta item ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointFormatError(f"{step / 'meta'}: expected a JSON object")
    return meta


def load_jax(path) -> tuple[GLMConfig, dict]:
    """(GLMConfig, params with numpy leaves) from a to-jax folder or a glm-train run directory."""
    ck = open_jax(path)
    reads = {p: ck.store.read_async(p) for p in ck.store.paths()}
    params = _unflatten({p: np.asarray(f.result()) for p, f in reads.items()})
    if not ck.cfg.scan_layers and "layers" in params:
        from glm_jax.model.transformer import unstack_layers
        params = unstack_layers(params)
    return ck.cfg, params
