"""The page-cache-bypassing writers of glm-convert: convert.direct (O_DIRECT files written at arbitrary offsets)
and the zarr chunk files convert.jax_io writes itself, against what tensorstore writes for the same arrays."""

import os
import pathlib

import ml_dtypes
import numpy as np
import pytest

from convert import direct, jax_io
from glm_jax.checkpoint.orbax import OrbaxStore


def _o_direct_works(folder) -> bool:
    try:
        fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    except (OSError, AttributeError):
        return False
    os.close(fd)
    return True


@pytest.mark.parametrize("mode", ["direct", "buffered"])
def test_writes_at_any_offset_in_any_order(tmp_path, monkeypatch, mode):
    """Pieces with unaligned ends, sharing 4 KB blocks, larger than the staging buffer, written out of order."""
    if mode == "buffered":
        monkeypatch.delattr(os, "O_DIRECT", raising=False)
    monkeypatch.setattr(direct, "PIECE", 3 * direct.ALIGN)  # several staged writes per piece
    rng = np.random.default_rng(0)
    want = rng.integers(0, 256, 70_001, dtype=np.uint8)
    cuts = np.sort(rng.choice(np.arange(1, len(want)), 9, replace=False))
    cuts = [0, 5, 4096, 4100, *cuts.tolist(), len(want)]
    pieces = [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
    rng.shuffle(pieces)
    with direct.File(tmp_path / "f", len(want)) as f:
        for a, b in pieces:
            f.write(a, want[a:b])
        used_direct = f.dfd is not None
    assert (tmp_path / "f").read_bytes() == want.tobytes()
    assert used_direct == (mode == "direct" and _o_direct_works(tmp_path))


def test_write_past_the_planned_size_is_refused(tmp_path):
    with direct.File(tmp_path / "f", 10) as f, pytest.raises(ValueError, match="past the planned size"):
        f.write(8, b"abc")


@pytest.mark.parametrize("source", ["aligned", "unaligned"])
def test_whole_files_of_every_size_class(tmp_path, monkeypatch, source):
    """From a 4 KB-aligned buffer (written without the staging copy) and from an unaligned one."""
    monkeypatch.setattr(direct, "PIECE", 5 * direct.ALIGN)
    rng = np.random.default_rng(2)
    for n in (0, 1, 4095, 4096, 4097, 3 * 4096, 1 << 20 | 17):
        buf = direct.empty((n + 1,), np.uint8)
        data = buf[:n] if source == "aligned" else buf[1:]
        assert (direct.address(data) % direct.ALIGN == 0) == (source == "aligned" or n == 0)
        data[:] = rng.integers(1, 256, n, dtype=np.uint8)  # no zero byte: a skipped byte would show
        direct.write_whole(tmp_path / f"w{n}", data)
        assert (tmp_path / f"w{n}").read_bytes() == data.tobytes()


def _tree():
    rng = np.random.default_rng(1)
    return {
        "w": rng.standard_normal((37, 11, 3)).astype(ml_dtypes.bfloat16),  # edge chunk along axis 0
        "e": rng.standard_normal((64, 8)).astype(np.float32),  # whole chunks only
        "b": rng.standard_normal((1000,)).astype(np.float16),  # 1-D, edge chunk
        "i": rng.integers(-5, 5, (9, 4)).astype(np.int32),
        "s": np.float32(3.5),  # 0-d: tensorstore writes it
        "m": _lazy(rng.standard_normal((10, 11, 6)).astype(np.float32), chunk=(5, 4, 6)),
    }  # a --mesh layout


def _lazy(a, chunk):
    """A leaf with its own on-disk chunk (as `glm-convert to-jax --mesh` gives), split along two axes."""
    return jax_io.Lazy(a.shape, a.dtype, lambda: a, order=-1, chunk=chunk)


def _files(folder: pathlib.Path) -> dict:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith("_") and p.name != "commit_success.txt"
    }


def test_chunk_files_equal_tensorstores(tmp_path, monkeypatch):
    """Every data and .zarray file byte-identical to tensorstore's own writes of the same leaves, and read back."""
    monkeypatch.setattr(jax_io, "CHUNK_BYTES", 400)  # several chunks per array, ragged last chunk
    monkeypatch.setattr(jax_io, "RAW_MIN_BYTES", 1 << 62)
    jax_io.save_params(tmp_path / "ts", _tree())
    calls = []
    monkeypatch.setattr(jax_io, "RAW_MIN_BYTES", 1)
    real = jax_io._write_chunks
    monkeypatch.setattr(jax_io, "_write_chunks", lambda *a: (calls.append(a[0]), real(*a)))
    jax_io.save_params(tmp_path / "raw", _tree())
    assert sum(len(c) for c in calls) > len(calls) == 5  # 5 arrays by us, in several chunks
    assert any(len(k) > 1 and k[1] > 0 for c in calls for k in c)  # a chunk grid along a second axis too
    ts_files, raw_files = _files(tmp_path / "ts"), _files(tmp_path / "raw")
    assert sorted(raw_files) == sorted(ts_files) and any(k.endswith(".0.0") for k in ts_files)
    for k in ts_files:
        assert raw_files[k] == ts_files[k], k
    store = OrbaxStore(tmp_path / "raw")
    for k, v in _tree().items():
        v = v.fetch() if isinstance(v, jax_io.Lazy) else np.asarray(v)
        got = store.read(k)
        assert got.dtype == v.dtype and got.tobytes() == v.tobytes(), k


@pytest.mark.parametrize("view", ["tall", "wide", "second-axis-split", "per-head", "not-transposed"])
@pytest.mark.parametrize("split", [False, True])
def test_transposed_copies_equal_numpys(monkeypatch, view, split):
    """rows.c (tiles, slabs, the two-thread split, per-head copies) against np.ascontiguousarray of the same view."""
    from glm_jax import hostbuf as rows

    monkeypatch.setattr(rows, "SPLIT_BYTES", 1 if split else 1 << 62)
    rng = np.random.default_rng(3)
    w = rng.standard_normal((700, 3, 40, 9) if view == "per-head" else (1200, 600)).astype(ml_dtypes.bfloat16)
    a = {
        "tall": lambda: w[:520].T,
        "wide": lambda: w.T,
        "second-axis-split": lambda: w.T.reshape(600, 12, 100),
        "per-head": lambda: w[:, 1].transpose(2, 0, 1),
        "not-transposed": lambda: w[::2],
    }[view]()
    assert a.size >= 1 << 16
    got = rows.c(a)
    want = np.ascontiguousarray(a)
    assert got.flags.c_contiguous and got.shape == want.shape and got.dtype == want.dtype
    assert got.tobytes() == want.tobytes()
