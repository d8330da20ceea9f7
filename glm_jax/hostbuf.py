"""Host buffers for checkpoint I/O: page-aligned numpy arrays, and a cache-friendly copy of transposed views.

Loading a PyTorch checkpoint transposes every [out, in] weight into a [in, out] kernel; exporting transposes it
back. `c` and `copy_2d` do that copy in tiles that keep the reads in cache (2-4x faster than
np.ascontiguousarray on large matrices). `empty` gives arrays that start on a 4 KB boundary, so that glm-convert
can write them with O_DIRECT without a staging copy.
"""

from __future__ import annotations

import numpy as np

ALIGN = 4096  # offset, length and buffer alignment O_DIRECT needs (a multiple of any logical block size)


def address(buf) -> int:
    """The memory address of a buffer's first byte."""
    return np.frombuffer(buf, np.uint8).ctypes.data if len(buf) else 0


def empty(shape, dtype):
    """np.empty whose data starts on a 4 KB boundary, so that whole-array O_DIRECT writes need no staging copy."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(n + ALIGN, np.uint8)
    skip = -address(raw) % ALIGN
    return raw[skip : skip + n].view(dtype).reshape(shape)


def c(a):
    """Contiguous copy. A transposed view (possibly with its second axis split) is copied by copy_2d, which
    keeps the reads in cache: 2-4x faster than np.ascontiguousarray on large matrices."""
    a = np.asarray(a)
    if a.flags.c_contiguous or a.ndim < 2 or a.size < (1 << 16) or not a.itemsize or a.strides[0] != a.itemsize:
        return np.ascontiguousarray(a)
    src = _raw(a)
    shape = src.shape
    try:
        src.shape = (a.shape[0], -1)  # [cols of the source, rows of the source]; raises if not a view
    except AttributeError:
        if a.ndim != 3:
            return np.ascontiguousarray(a)
        out = empty(shape, src.dtype)
        for n in range(a.shape[1]):  # [D, N, H] from per-head blocks: one transposed copy per head
            copy_2d(out[:, n], src[:, n])
        return out.view(a.dtype)
    out = empty(src.shape, src.dtype)
    copy_2d(out, src)
    return out.view(a.dtype).reshape(a.shape)


def _raw(a):
    return a.view(f"u{a.itemsize}") if a.itemsize in (1, 2, 4, 8) else a


def copy_2d(out, src):
    """out[...] = src for a 2-D transposed view src: square tiles when the output is tall (its rows are long
    runs of the source), slabs of 16 output columns when it is wide (measured on [27392, 4096] and
    [4096, 27392] bf16: 0.20 s and 0.26 s, against 0.46 s and 0.31 s for slabs alone). A large copy is split
    in two halves of rows, one on a second thread (1.3-2x faster on 2 cores, measured; no extra memory).
    Small or not transposed sources are plainly assigned."""
    if src.size < (1 << 16) or src.strides[0] != src.itemsize:
        out[...] = src
        return
    out, src = _raw(out), _raw(src)
    R = src.shape[0]
    if src.nbytes < SPLIT_BYTES or R < 512:
        _tiles(out, src)
        return
    h = (R // 2 + 255) // 256 * 256
    other = _pool().submit(_tiles, out[h:], src[h:])
    try:
        _tiles(out[:h], src[:h])
    finally:
        other.result()


SPLIT_BYTES = 16 << 20
_POOL = []


def _pool():
    if not _POOL:
        import concurrent.futures

        _POOL.append(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="glm-convert-copy"))
    return _POOL[0]


def _tiles(out, src):
    R, C = src.shape
    if R >= C:
        for i in range(0, R, 256):
            for j in range(0, C, 256):
                out[i : i + 256, j : j + 256] = src[i : i + 256, j : j + 256]
    else:
        for j in range(0, C, 16):
            out[:, j : j + 16] = src[:, j : j + 16]
