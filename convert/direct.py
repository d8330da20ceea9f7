"""Writes that bypass the page cache (O_DIRECT), for the multi-GB outputs of glm-convert.

On the VMs we measured, a buffered write() spends most of its time touching page-cache pages the guest has not
used yet (0.2 GB/s to durable bytes for a 512 MB write in 8 MB pieces), while O_DIRECT writes from one reused,
aligned staging buffer go straight to the disk (~1 GB/s, steady). Where the filesystem refuses O_DIRECT (tmpfs,
some network filesystems) the same calls fall back to plain positioned writes.
"""

from __future__ import annotations

import mmap
import os
import threading

from glm_jax.hostbuf import ALIGN, address, empty  # noqa: F401 - aligned buffers live in the library

PIECE = 8 << 20  # staging buffer: one O_DIRECT write


class File:
    """A file of known final size, written at arbitrary offsets with `write(offset, data)`.

    The 4 KB-aligned interior of each write goes through O_DIRECT from the staging buffer; its unaligned ends
    (less than 4 KB each) go through an ordinary descriptor, so neighbouring writes may share a block."""

    def __init__(self, path, size: int):
        self.path, self.size = str(path), int(size)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.dfd = None
        try:
            os.ftruncate(self.fd, self.size)
            flag = getattr(os, "O_DIRECT", 0)
            if flag and self.size >= ALIGN:
                try:
                    self.dfd = os.open(self.path, os.O_WRONLY | flag)
                except OSError:
                    self.dfd = None
        except BaseException:
            os.close(self.fd)
            raise

    def write(self, offset: int, data) -> None:
        mv = memoryview(data).cast("B")
        end = offset + len(mv)
        if end > self.size:
            raise ValueError(f"{self.path}: write of [{offset}, {end}) past the planned size {self.size}")
        lo, hi = -(-offset // ALIGN) * ALIGN, end // ALIGN * ALIGN
        if self.dfd is None or hi <= lo:
            _pwrite(self.fd, mv, offset)
            return
        _pwrite(self.fd, mv[: lo - offset], offset)
        if not self._direct(mv[lo - offset : hi - offset], lo):
            _pwrite(self.fd, mv[lo - offset : hi - offset], lo)
        _pwrite(self.fd, mv[hi - offset :], hi)

    def _direct(self, mv, offset) -> bool:
        """O_DIRECT write of an aligned range; False (nothing written) if the filesystem refuses it."""
        stage = memoryview(_stage())
        piece = min(PIECE, len(stage)) // ALIGN * ALIGN
        aligned = address(mv) % ALIGN == 0  # then written straight from the source, no staging copy
        try:
            for i in range(0, len(mv), piece):
                n = min(piece, len(mv) - i)
                if aligned:
                    src = mv[i : i + n]
                else:
                    stage[:n] = mv[i : i + n]
                    src = stage[:n]
                if os.pwrite(self.dfd, src, offset + i) != n:
                    raise OSError(f"{self.path}: short write")
        except OSError as e:
            if i == 0 and e.errno == 22:  # EINVAL: O_DIRECT not supported here after all
                os.close(self.dfd)
                self.dfd = None
                return False
            raise
        finally:
            stage.release()
        return True

    def close(self) -> None:
        try:
            if self.dfd is not None:
                os.close(self.dfd)
        finally:
            self.dfd = None
            os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_local = threading.local()


def _stage() -> mmap.mmap:
    """This thread's staging buffer: page-aligned, private, kept for the life of the thread (a new mapping per
    file would be fresh pages every time, which is what O_DIRECT is here to avoid)."""
    if getattr(_local, "stage", None) is None:
        _local.stage = mmap.mmap(-1, PIECE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return _local.stage


def write_whole(path, data) -> None:
    """A new file holding exactly `data`."""
    mv = memoryview(data).cast("B")
    with File(path, len(mv)) as f:
        f.write(0, mv)


def _pwrite(fd, mv, offset, piece=PIECE):
    """Positioned write in 8 MB pieces (on some VMs one huge write() is several times slower)."""
    for i in range(0, len(mv), piece):
        chunk = mv[i : i + piece]
        done = 0
        while done < len(chunk):
            done += os.pwrite(fd, chunk[done:], offset + i + done)
