"""Reading from gs:// through the GCS emulator (tests/_gcs.py): the storage layer itself, from_pretrained on an HF
safetensors folder (streamed: ranged reads only) and on a to-jax folder (Orbax/TensorStore's gcs driver), and
load_tokenizer. Expected values are the golden fixtures (reference logits, the reference tokenizer's ids)."""

import json
import os
import pathlib
import tempfile
import uuid

import numpy as np
import pytest
from helpers.fixture_models import FIX, max_diff, reference_inputs
from helpers.gcs import no_gs_folder

from glm_jax import storage
from glm_jax.errors import StorageError


def upload(local: pathlib.Path, url: str):
    fs = storage.filesystem()
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.put_file(str(f), url[len("gs://") :] + "/" + f.relative_to(local).as_posix())


def fresh(gcs, name="x") -> str:
    return f"gs://glm-test/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(autouse=True)
def _no_gs_folder(gcs):
    yield
    assert not no_gs_folder(os.getcwd(), tempfile.gettempdir()), "a gs:// URL was taken for a local path"


def test_storage_basics(gcs):
    url = fresh(gcs, "basics")
    storage.write_text(url + "/a/b.txt", "hello")
    storage.write_bytes(url + "/c.bin", bytes(range(256)))
    assert storage.exists(url + "/a/b.txt") and storage.isdir(url + "/a") and not storage.isdir(url + "/c.bin")
    assert storage.listdir(url) == ["a", "c.bin"]
    assert storage.read_text(url + "/a/b.txt") == "hello"
    assert storage.read_range(url + "/c.bin", 10, 20) == bytes(range(10, 20))
    assert storage.size(url + "/c.bin") == 256
    storage.copy(url + "/c.bin", url + "/d.bin")
    assert storage.read_bytes(url + "/d.bin") == bytes(range(256))
    storage.rmtree(url)
    assert not storage.exists(url + "/a/b.txt") and not storage.exists(url)


def test_missing_bucket_and_object_are_storage_errors(gcs):
    with pytest.raises(StorageError, match=r"gs://glm-test/nothing-here/x: no such object"):
        storage.read_bytes("gs://glm-test/nothing-here/x")
    with pytest.raises(StorageError, match=r"gs://no-such-bucket-zz/x: no such object or bucket"):
        storage.read_text("gs://no-such-bucket-zz/x")
    assert not storage.exists("gs://no-such-bucket-zz/x")


def test_half_written_folder_is_refused(gcs):
    url = fresh(gcs, "half")
    storage.begin_folder(url)
    storage.write_text(url + "/config.json", "{}")
    with pytest.raises(StorageError, match="half-written"):
        storage.check_complete(url)
    storage.commit_folder(url)
    storage.check_complete(url)


def _golden_logits(lm, name):
    d = dict(np.load(FIX / name / "io.npz"))
    kw, real = reference_inputs(name, d)
    return max_diff(lm(d["input_ids"], **kw), d["logits"], real)


def test_from_pretrained_streams_safetensors(gcs, monkeypatch):
    import glm_jax
    from glm_jax.checkpoint import files

    name = "chatglm2-6b"
    url = fresh(gcs, "hf")
    upload(FIX / name / "model_sharded_safetensors", url)
    reads = []
    real = storage.read_range
    monkeypatch.setattr(files.storage, "read_range", lambda p, a, b: reads.append((str(p), a, b)) or real(p, a, b))
    # no whole-file reads of the weights: only headers and tensor ranges
    monkeypatch.setattr(storage, "download_folder", None)
    lm = glm_jax.from_pretrained(url)
    assert _golden_logits(lm, name) <= 1e-4
    shards = {p for p, _, _ in reads}
    assert len(shards) == 4 and all(p.startswith(url) for p in shards)
    for p in shards:  # only the length, the header and single tensors' byte spans were read: never the whole file
        raw = (FIX / name / "model_sharded_safetensors" / p.rsplit("/", 1)[1]).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        spans = {(0, 8), (8, 8 + n)} | {
            (8 + n + h["data_offsets"][0], 8 + n + h["data_offsets"][1])
            for k, h in json.loads(raw[8 : 8 + n]).items()
            if k != "__metadata__"
        }
        got = {(a, b) for q, a, b in reads if q == p}
        assert got <= spans and len(got) > 2


def test_from_pretrained_to_jax_folder(gcs, tmp_path):
    import glm_jax
    from convert.cli import main

    name = "chatglm2-6b"
    assert main(["to-jax", str(FIX / name / "model"), str(tmp_path / "jax")]) == 0
    url = fresh(gcs, "jax")
    upload(tmp_path / "jax", url)
    assert _golden_logits(glm_jax.from_pretrained(url), name) <= 1e-4


def test_load_tokenizer_from_gcs(gcs):
    from glm_jax.tokenizers import load_tokenizer

    for name in ("chatglm3-6b", "glm-4-9b-chat"):
        local = FIX / "chat-templates" / name
        url = fresh(gcs, "tok")
        upload(local, url)
        cases = json.loads((local / "encode.json").read_text())["cases"]
        tok = load_tokenizer(url)
        assert type(tok) is type(load_tokenizer(local))
        for case in cases:
            assert tok.encode(case["text"], add_special_tokens=True) == case["ids"], case["id"]


def test_load_tokenizer_missing(gcs):
    from glm_jax.tokenizers import load_tokenizer

    with pytest.raises(FileNotFoundError, match="gs://glm-test/none-such: tokenizer folder not found"):
        load_tokenizer("gs://glm-test/none-such")


def test_tensorstore_url_from_storage_emulator_host(gcs, tmp_path):
    """Only STORAGE_EMULATOR_HOST set (DESIGN §3.11): glm-jax points TensorStore at it too, in a fresh process."""
    import subprocess
    import sys

    from convert.cli import main

    name = "chatglm2-6b"
    assert main(["to-jax", str(FIX / name / "model"), str(tmp_path / "jax")]) == 0
    url = fresh(gcs, "jax")
    upload(tmp_path / "jax", url)
    env = {k: v for k, v in os.environ.items() if k != "TENSORSTORE_GCS_HTTP_URL"}
    env.pop("XLA_FLAGS", None)
    code = (
        "import os, sys, numpy as np, glm_jax; lm = glm_jax.from_pretrained(sys.argv[1]); "
        "print(os.environ['TENSORSTORE_GCS_HTTP_URL']); "
        "np.save(sys.argv[2], np.asarray(lm.params['embed']['embedding']))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, url, str(tmp_path / "e.npy")], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-1] == os.environ["STORAGE_EMULATOR_HOST"]
    import torch

    sd = torch.load(FIX / name / "model" / "pytorch_model.bin", weights_only=True)
    want = sd["transformer.embedding.word_embeddings.weight"].float().numpy()
    assert np.array_equal(np.load(tmp_path / "e.npy"), want)
