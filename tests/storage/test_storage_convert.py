"""glm-convert with gs:// SRC and DST through the GCS emulator, and through a flaky proxy in front of it (503/429 to a
share of requests, delays to others; 403 to every write). Expected bytes are the fixture files themselves."""

import os
import pathlib
import tempfile
import uuid

import pytest
from helpers.fixture_models import FIX
from helpers.gcs import FlakyProxy, no_gs_folder

from convert.cli import main
from glm_jax import storage

NAME = "chatglm2-6b"
SRC = FIX / NAME / "model_sharded_safetensors"


@pytest.fixture(autouse=True)
def _no_gs_folder(gcs):
    yield
    assert not no_gs_folder(os.getcwd(), tempfile.gettempdir()), "a gs:// URL was taken for a local path"


def fresh(name="x") -> str:
    return f"gs://glm-test/{name}-{uuid.uuid4().hex[:8]}"


def upload(local: pathlib.Path, url: str):
    fs = storage.filesystem()
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.put_file(str(f), url[len("gs://") :] + "/" + f.relative_to(local).as_posix())


def objects(url: str) -> dict:
    """{relative name: bytes} of every object under url (read straight from the emulator)."""
    fs = storage.filesystem()
    key = url[len("gs://") :]
    if not fs.exists(key):
        return {}
    return {f[len(key) + 1 :]: fs.cat_file(f) for f in fs.find(key)}


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def same_files(url: str, local: pathlib.Path):
    got = objects(url)
    want = {f.relative_to(local).as_posix(): f.read_bytes() for f in local.rglob("*") if f.is_file()}
    assert sorted(got) == sorted(want)
    assert all(got[k] == want[k] for k in want)


def round_trip():
    src, jax_dst, back = fresh("src"), fresh("jax"), fresh("back")
    upload(SRC, src)
    assert main(["to-jax", src, jax_dst]) == 0
    assert storage.WRITING_MARKER not in objects(jax_dst) and "glm_jax.json" in objects(jax_dst)
    assert main(["to-torch", jax_dst, back]) == 0
    same_files(back, SRC)  # the fixture's files, byte for byte
    return src, jax_dst


def test_to_jax_and_back_through_gcs(gcs, tmp_path):
    import numpy as np
    from helpers.fixture_models import max_diff, reference_inputs

    import glm_jax

    _, jax_dst = round_trip()
    d = dict(np.load(FIX / NAME / "io.npz"))
    kw, real = reference_inputs(NAME, d)
    assert max_diff(glm_jax.from_pretrained(jax_dst)(d["input_ids"], **kw), d["logits"], real) <= 1e-4
    # local SRC -> gs DST and gs SRC -> local DST are the same files
    assert main(["to-torch", jax_dst, str(tmp_path / "local")]) == 0
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == sorted(p.name for p in SRC.iterdir())
    assert all((tmp_path / "local" / p.name).read_bytes() == p.read_bytes() for p in SRC.iterdir())


def test_overwrite_rules_on_gcs(gcs, capsys):
    src, dst = fresh("src"), fresh("dst")
    upload(SRC, src)
    assert main(["to-jax", src, dst]) == 0
    before = objects(dst)
    capsys.readouterr()
    assert main(["to-jax", src, dst]) == 2
    assert "already exists (pass --overwrite" in one_error(capsys)
    assert objects(dst) == before
    assert main(["to-jax", src, src, "--overwrite"]) == 2
    assert "is the source itself" in one_error(capsys)
    assert main(["to-jax", src + "/inner", src.rsplit("/", 1)[0], "--overwrite"]) == 2
    one_error(capsys)
    assert main(["to-jax", src, dst, "--overwrite"]) == 0
    assert objects(dst).keys() == before.keys()


@pytest.mark.parametrize(
    "src,dst,says",
    [
        ("gs://no-such-bucket-zz/m", None, "no such bucket 'no-such-bucket-zz'"),
        ("gs://glm-test/no-such-model", None, "gs://glm-test/no-such-model: no such file or folder"),
        (None, "gs://no-such-bucket-zz/out", "no such bucket 'no-such-bucket-zz'"),
    ],
)
def test_missing_bucket_or_object_exit_2(gcs, capsys, src, dst, says):
    src = src or str(SRC)
    dst = dst or fresh("dst")
    assert main(["to-jax", src, dst]) == 2
    assert says in one_error(capsys)
    if dst.startswith("gs://glm-test"):
        assert objects(dst) == {}


def test_half_written_source_refused(gcs, capsys):
    src, dst = fresh("src"), fresh("jax")
    upload(SRC, src)
    assert main(["to-jax", src, dst]) == 0
    storage.begin_folder(dst)  # as an interrupted writer leaves it
    capsys.readouterr()
    assert main(["to-torch", dst, fresh("back")]) == 2
    assert "half-written" in one_error(capsys)
    with pytest.raises(storage.StorageError, match="half-written"):
        import glm_jax

        glm_jax.from_pretrained(dst)


def test_flaky_store_still_converts_bit_exact(gcs, monkeypatch):
    proxy = FlakyProxy(gcs.port, fail=0.1, slow=0.3, delay=0.2, seed=1)  # each 503/429 costs gcsfs a 1-2 s backoff
    try:
        for k, v in gcs.env(proxy.url).items():
            monkeypatch.setenv(k, v)
        round_trip()
    finally:
        proxy.stop()
    assert proxy.counts["failed"] > 3 and proxy.counts["delayed"] > 5 and proxy.counts["forwarded"] > 20


def test_store_refusing_writes_exit_2_nothing_written(gcs, capsys, monkeypatch):
    dst = fresh("denied")
    proxy = FlakyProxy(gcs.port, deny_writes=True)
    try:
        with monkeypatch.context() as m:
            for k, v in gcs.env(proxy.url).items():
                m.setenv(k, v)
            assert main(["to-jax", str(SRC), dst]) == 2
    finally:
        proxy.stop()
    line = one_error(capsys)
    assert dst in line and "permission denied" in line
    assert proxy.counts["denied"] >= 1
    assert objects(dst) == {}


@pytest.mark.parametrize("deletes", [True, False])
def test_write_failing_midway_leaves_nothing_that_looks_complete(gcs, capsys, monkeypatch, deletes):
    """A few objects get written, then the store refuses: DST is removed again; a store that refuses the deletes too
    keeps the writing marker, so every reader refuses the half-written folder."""
    import glm_jax

    dst = fresh("midway")
    proxy = FlakyProxy(gcs.port, uploads_after=3, deny_writes=False)
    try:
        with monkeypatch.context() as m:
            for k, v in gcs.env(proxy.url).items():
                m.setenv(k, v)
            if not deletes:
                real = storage.rmtree
                m.setattr(storage, "rmtree", lambda p: proxy.__setattr__("deny_writes", True) or real(p))
            assert main(["to-jax", str(SRC), dst]) == 2
    finally:
        proxy.stop()
    line = one_error(capsys)
    assert dst in line and "permission denied" in line
    left = objects(dst)
    if deletes:
        assert left == {}
    else:
        assert storage.WRITING_MARKER in left and len(left) >= 2  # the marker and what got written after it
        with pytest.raises(storage.StorageError, match="half-written"):
            glm_jax.from_pretrained(dst)
