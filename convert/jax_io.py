"""Writing glm-jax checkpoint folders (`glm-convert to-jax`): params streamed into Orbax one tensor at a time.

The folder layout is described in glm_jax/checkpoint/orbax.py, which reads it. The leaves of the tree given to
`save_jax` may be `Lazy` (computed when Orbax reaches them, in `order`), and at most two tensors are in memory at
once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import pathlib
from collections.abc import Callable

import numpy as np

from convert import direct, guard
from glm_jax.checkpoint.orbax import FORMAT, JSON_NAME, quiet_absl
from glm_jax.config import GLMConfig
from glm_jax.errors import CheckpointFormatError

CHUNK_BYTES = 16 << 20
RAW_MIN_BYTES = 1 << 20  # arrays at least this large: chunk files written by us through O_DIRECT, not by tensorstore
USE_OCDBT = False  # one zarr folder per leaf: measured faster than OCDBT for one-pass conversion
_TS_CONTEXT = {
    "file_io_concurrency": {"limit": 128},
    "cache_pool#ocdbt": {"total_bytes_limit": 100_000_000},
    "file_io_sync": False,
}


class Lazy:
    """A params leaf whose array is computed by `fetch()` when it is written (in increasing `order`)."""

    def __init__(self, shape, dtype, fetch: Callable[[], np.ndarray], order: int = 0, chunk=None):
        self.shape, self.dtype, self.fetch, self.order = tuple(shape), np.dtype(dtype), fetch, order
        self.chunk = tuple(chunk) if chunk is not None else None  # on-disk chunk (write) shape
        self.ndim, self.size = len(self.shape), int(np.prod(self.shape))
        self.nbytes = self.size * self.dtype.itemsize


def _stream_handler(progress):
    import orbax.checkpoint as ocp
    import tensorstore as ts
    from orbax.checkpoint._src.futures import future
    from orbax.checkpoint._src.serialization import ocdbt_utils, type_handlers
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

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
                            raise CheckpointFormatError(
                                f"{info.name}: got {a.dtype}{list(a.shape)}, expected {value.dtype}{list(value.shape)}"
                            )
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
                info=info,
                arg=arg,
                global_shape=a.shape,
                local_shape=chunk or _chunk(a),
                dtype=a.dtype,
                use_ocdbt=use_ocdbt,
                process_index=ocdbt_utils.get_process_index_for_subdir(use_ocdbt=use_ocdbt),
            ).json
            t = await ts.open(ts.Spec(spec), create=True, open=True, context=ctx)
            files = _raw_chunk_files(t, a)
            if files is not None:  # the chunk files tensorstore would write, through O_DIRECT (see direct.py)
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
    if (
        js.get("driver") != "zarr"
        or kv.get("driver") != "file"
        or md.get("compressor") is not None
        or md.get("filters") is not None
        or md.get("order", "C") != "C"
        or np.dtype(t.dtype.numpy_dtype) != a.dtype
        or a.dtype.byteorder == ">"
    ):
        return None
    sep = md.get("dimension_separator", ".")
    chunks = tuple(md["chunks"])
    root = pathlib.Path(kv["path"])
    grid = [range(-(-n // c)) for n, c in zip(a.shape, chunks)]
    return {ix: root / sep.join(map(str, ix)) for ix in itertools.product(*grid)}


def _write_chunks(files, a, chunks):
    for ix, path in files.items():
        guard.check_stop()
        sl = tuple(slice(i * c, (i + 1) * c) for i, c in zip(ix, chunks))
        part = a[sl]
        if part.shape != chunks:  # an edge chunk is stored at full size, padded with zeros
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
    params = jax.tree.map(
        lambda x: x if isinstance(x, Lazy) else _eager(x, next(order)), params, is_leaf=lambda x: isinstance(x, Lazy)
    )
    with quiet_absl():
        registry = ocp.type_handlers.create_type_handler_registry((Lazy, _stream_handler(progress)))
        handler = ocp.PyTreeCheckpointHandler(
            type_handler_registry=registry, use_compression=False, use_ocdbt=USE_OCDBT
        )
        ocp.Checkpointer(handler).save(pathlib.Path(directory).absolute(), args=ocp.args.PyTreeSave(params))


def _eager(x, order):
    a = np.asarray(x)
    return Lazy(a.shape, a.dtype, lambda: a, order=-(1 << 40) + order)


def save_jax(dst, cfg: GLMConfig, params, manifest: dict | None, *, mesh=None, progress=None):
    """Write a to-jax folder: params/ (streamed), glm_jax.json (config + source manifest), config.json."""
    dst = pathlib.Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    save_params(dst / "params", params, progress)
    guard.check_stop()
    meta = {"format": FORMAT, "version": 1, "config": cfg.to_dict(), "source": manifest, "mesh": mesh}
    (dst / JSON_NAME).write_text(json.dumps(meta, indent=1) + "\n")
    (dst / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2, sort_keys=True) + "\n")
