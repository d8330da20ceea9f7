"""glm-convert trusts nothing: malformed safetensors headers (generated with hypothesis), index shards outside
SRC, config.json sizes that lie about the tensors, bad config values, unwritable destinations, --overwrite next
to its own input, and SIGINT / SIGTERM / SIGKILL at random moments of a real conversion.

Bad input: exit 2, exactly one stderr line `error: ...` naming the file, no DST, no temporary folder beside it.
The in-process cases call convert.cli.main (as test_convert_errors does); the signal cases run subprocesses on
a ~310 MB synthetic ChatGLM2-shaped checkpoint. The header mutations and the checkpoint are built in
tests/helpers/convert_synth.py.
"""

import contextlib
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from helpers import ROOT, cli
from helpers.convert_synth import KINDS, build_checkpoint, malformed, same_params, tree_snapshot
from helpers.fixture_models import FIX
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convert.cli import main

BASE = FIX / "chatglm2-6b"


def _run_main(capfd, argv):
    """glm-convert's main in this process; capfd, since a refusal must leave nothing else on the descriptors."""
    return cli.run_main(capfd, main, *argv)


def _assert_bad(rc, err, dst, *fragments):
    line = cli.Result(rc, "", err).error_line()
    for f in fragments:
        assert str(f) in line, (f, line)
    assert not dst.exists() and not dst.is_symlink()
    if dst.parent.is_dir():
        assert not [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


# ------------------------------------------------------------------ malformed safetensors headers (hypothesis)
@pytest.fixture(scope="module")
def st_source(tmp_path_factory):
    """The chatglm2 fixture as one model.safetensors (written by the safetensors library) + its config.json."""
    import safetensors.numpy

    from glm_jax.checkpoint.hf import open_weights

    d = tmp_path_factory.mktemp("st") / "src"
    d.mkdir()
    _, readers = open_weights(BASE / "model_sharded_safetensors")
    safetensors.numpy.save_file({k: np.array(r.get(k)) for k, r in readers.items()}, d / "model.safetensors")
    shutil.copy(BASE / "model_sharded_safetensors" / "config.json", d / "config.json")
    raw = (d / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return d, json.loads(raw[8 : 8 + n]), raw[8 + n :]


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_malformed_safetensors_header_exits_2(st_source, capfd, kind, data):
    import safetensors

    src, header, payload = st_source
    with tempfile.TemporaryDirectory(dir=src.parent) as tmp:
        bad = pathlib.Path(tmp) / "src"
        bad.mkdir()
        shutil.copy(src / "config.json", bad / "config.json")
        (bad / "model.safetensors").write_bytes(malformed(kind, header, payload, data.draw))
        # the safetensors library refuses it too (whatever its error type)
        with pytest.raises(Exception), safetensors.safe_open(str(bad / "model.safetensors"), framework="np") as f:  # noqa: B017
            [f.get_tensor(k) for k in f.keys()]  # noqa: SIM118 - safe_open has keys() only
        dst = pathlib.Path(tmp) / "out" / "dst"
        rc, _, err = _run_main(capfd, ["to-jax", bad, dst])
        _assert_bad(rc, err, dst, bad / "model.safetensors")
        assert not dst.parent.exists()  # the folder made for DST is gone again


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), pad=st.integers(0, 64), meta=st.dictionaries(st.text(), st.text(), max_size=3))
def test_valid_header_variants_convert(st_source, capfd, seed, pad, meta):
    """No false alarms: reordered entries, extra padding and string metadata are valid (exit 0)."""
    src, header, payload = st_source
    order = [k for k in header if k != "__metadata__"]
    np.random.default_rng(seed).shuffle(order)
    h = {"__metadata__": meta, **{k: header[k] for k in order}}
    text = json.dumps(h).encode() + b" " * pad
    with tempfile.TemporaryDirectory(dir=src.parent) as tmp:
        ok = pathlib.Path(tmp) / "src"
        ok.mkdir()
        shutil.copy(src / "config.json", ok / "config.json")
        (ok / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + payload)
        rc, _, err = _run_main(capfd, ["to-jax", ok, pathlib.Path(tmp) / "dst"])
        assert rc == 0, err


# ------------------------------------------------------------------ index shards outside SRC
@pytest.mark.parametrize("how", ["parent", "absolute", "subfolder", "dotdot"])
def test_index_shard_outside_src(tmp_path, capfd, how):
    src = tmp_path / "src"
    shutil.copytree(BASE / "model_sharded_safetensors", src)
    shard = "model-00002-of-00004.safetensors"
    elsewhere = {"parent": tmp_path / "other", "absolute": tmp_path / "abs", "subfolder": src / "sub"}
    if how in elsewhere:
        elsewhere[how].mkdir()
        shutil.move(src / shard, elsewhere[how] / shard)
    name = {
        "parent": f"../other/{shard}",
        "absolute": str(tmp_path / "abs" / shard),
        "subfolder": f"sub/{shard}",
        "dotdot": "..",
    }[how]
    idx = src / "model.safetensors.index.json"
    d = json.loads(idx.read_text())
    d["weight_map"] = {k: (name if v == shard else v) for k, v in d["weight_map"].items()}
    idx.write_text(json.dumps(d))
    dst = tmp_path / "dst"
    rc, _, err = _run_main(capfd, ["to-jax", src, dst])
    _assert_bad(rc, err, dst, idx, repr(name))


def test_hf_cache_snapshot_of_links_converts(tmp_path, capfd):
    """Every file of a Hugging Face cache snapshot is a link into blobs/: still the folder's own shards."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted((BASE / "model_sharded_safetensors").iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        (snap / f.name).symlink_to(pathlib.Path("../../blobs") / f"blob{i}")
    rc, _, err = _run_main(capfd, ["to-jax", snap, tmp_path / "dst"])
    assert rc == 0, err


# ------------------------------------------------------------------ config.json that lies, or is bad
def _with_config(tmp_path, edit, fixture=BASE, sub="model_sharded_safetensors"):
    src = tmp_path / "src"
    shutil.copytree(fixture / sub, src)
    c = json.loads((src / "config.json").read_text())
    edit(c)
    (src / "config.json").write_text(json.dumps(c))
    return src


@pytest.mark.parametrize(
    "key,value,says",
    [
        ("num_layers", 10**9, "num_layers=1000000000"),
        ("num_layers", 3, "num_layers=3"),
        ("num_layers", 1, "num_layers=1"),
        ("padded_vocab_size", 10**12, "vocab_size=1000000000000"),
        ("hidden_size", 10**9, "hidden_size=1000000000"),
        ("ffn_hidden_size", 10**12, "ffn_size=1000000000000"),
        ("kv_channels", 10**8, "head_dim"),
    ],
)
def test_config_sizes_checked_against_tensors_first(tmp_path, capfd, key, value, says):
    src = _with_config(tmp_path, lambda c: c.update({key: value}))
    t = time.time()
    rc, _, err = _run_main(capfd, ["to-jax", src, tmp_path / "dst"])
    assert time.time() - t < 20  # headers only: no per-layer expansion, no allocation
    _assert_bad(rc, err, tmp_path / "dst", src / "config.json", says)


def test_from_pretrained_checks_too(tmp_path):
    import glm_jax
    from glm_jax.errors import CheckpointFormatError

    src = _with_config(tmp_path, lambda c: c.update(num_layers=10**9))
    with pytest.raises(CheckpointFormatError, match="num_layers=1000000000"):
        glm_jax.from_pretrained(src)


BAD_VALUES = [
    (BASE, "num_attention_heads", 0),
    (BASE, "num_attention_heads", -4),
    (BASE, "hidden_size", 0),
    (BASE, "hidden_size", -64),
    (BASE, "padded_vocab_size", 0),
    (BASE, "padded_vocab_size", -512),
    (BASE, "multi_query_group_num", 0),
    (BASE, "kv_channels", 0),
    (BASE, "hidden_size", "64"),
    (BASE, "num_layers", "2"),
    (BASE, "kv_channels", "16"),
    (BASE, "ffn_hidden_size", 128.0),
    (BASE, "num_attention_heads", 4.5),
    (BASE, "hidden_size", True),
    (BASE, "hidden_size", [64]),
    (BASE, "hidden_size", None),
    (BASE, "seq_length", "long"),
    (BASE, "layernorm_epsilon", "tiny"),
    (FIX / "transformers-glm", "hidden_size", "64"),
    (FIX / "transformers-glm", "num_key_value_heads", 0),
    (FIX / "transformers-glm", "head_dim", 16.0),
    (FIX / "transformers-glm", "head_dim", 0),
    (FIX / "transformers-glm", "intermediate_size", -1),
    (FIX / "chatglm-6b", "inner_hidden_size", "128"),
    (FIX / "chatglm-6b", "num_attention_heads", 0),
    (FIX / "chatglm-6b", "inner_hidden_size", 0),
    (FIX / "glm-original", "num_attention_heads", -1),
    (FIX / "glm-original", "vocab_size", 384.0),
]


@pytest.mark.parametrize("fixture,key,value", BAD_VALUES, ids=[f"{f.name}-{k}-{v!r}" for f, k, v in BAD_VALUES])
def test_bad_config_value_exits_2(tmp_path, capfd, fixture, key, value):
    src = _with_config(tmp_path, lambda c: c.update({key: value}), fixture, "model")
    dst = tmp_path / "dst"
    rc, _, err = _run_main(capfd, ["to-jax", src, dst])
    _assert_bad(rc, err, dst, src / "config.json")


# ------------------------------------------------------------------ destinations that cannot be written
def test_dst_parent_is_a_file(tmp_path, capfd):
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep")
    dst = blocker / "out"
    rc, _, err = _run_main(capfd, ["to-jax", BASE / "model", dst])
    assert rc == 2 and err.strip().splitlines() == [err.strip()] and str(dst) in err, err
    assert blocker.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_dst_under_proc(tmp_path, capfd):
    dst = pathlib.Path("/proc/glm-convert-test-no-such-dir/out")
    rc, _, err = _run_main(capfd, ["to-jax", BASE / "model", dst])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: ") and str(dst) in err, err


def test_parents_made_for_dst_are_removed_on_failure(tmp_path, capfd):
    src = _with_config(tmp_path, lambda c: c.update(hidden_size=0))
    dst = tmp_path / "a" / "b" / "c" / "dst"
    rc, _, err = _run_main(capfd, ["to-jax", src, dst])
    _assert_bad(rc, err, dst, "hidden_size")
    assert not (tmp_path / "a").exists()


# ------------------------------------------------------------------ --overwrite next to its own input
@pytest.fixture
def nested(tmp_path):
    parent = tmp_path / "parent"
    src = parent / "src"
    shutil.copytree(BASE / "model", src)
    (parent / "other.txt").write_text("other")
    return parent, src


@pytest.mark.parametrize("target", ["parent", "grandparent", "src", "link_to_src", "file_in_src"])
def test_overwrite_never_touches_the_source(nested, capfd, target):
    parent, src = nested
    (parent.parent / "link").symlink_to(src)
    dst = {
        "parent": parent,
        "grandparent": parent.parent,
        "src": src,
        "link_to_src": parent.parent / "link",
        "file_in_src": src / "config.json",
    }[target]
    before = tree_snapshot(parent.parent)
    rc, _, err = _run_main(capfd, ["to-jax", src, dst, "--overwrite"])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: ") and str(dst) in err, err
    assert tree_snapshot(parent.parent) == before


def test_overwrite_never_replaces_the_ptuning_input(tmp_path, capfd):
    pt = tmp_path / "pt"
    shutil.copytree(FIX / "chatglm2-6b-ptuning-v2" / "ptuning_checkpoint", pt)
    before = tree_snapshot(pt)
    rc, _, err = _run_main(capfd, ["to-jax", BASE / "model", pt, "--ptuning", pt, "--overwrite"])
    assert rc == 2 and "--ptuning" in err and len(err.strip().splitlines()) == 1, err
    assert tree_snapshot(pt) == before


def test_new_dst_inside_src_is_allowed_once(nested, capfd):
    _, src = nested
    before = tree_snapshot(src)
    rc, _, err = _run_main(capfd, ["to-jax", src, src / "jax"])
    assert rc == 0, err
    assert {k: v for k, v in tree_snapshot(src).items() if not k.startswith("jax")} == before
    rc, _, err = _run_main(capfd, ["to-jax", src, src / "jax", "--overwrite"])  # now it exists inside SRC
    assert rc == 2 and "inside the source" in err, err


# ------------------------------------------------------------------ temporary folders of dead runs
def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporary_folders_are_cleared(tmp_path, capfd):
    dead, live = _dead_pid(), os.getppid()
    (tmp_path / f".dst.tmp-{dead}" / "params").mkdir(parents=True)
    (tmp_path / f".dst.tmp-{live}").mkdir()
    (tmp_path / f".dstx.tmp-{dead}").mkdir()  # another DST's: not ours to judge
    rc, out, err = _run_main(capfd, ["to-jax", BASE / "model", tmp_path / "dst"])
    assert rc == 0, err
    said = [line for line in out.splitlines() if "cleared" in line]
    assert len(said) == 1 and f".dst.tmp-{dead}" in said[0], out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["dst", f".dst.tmp-{live}", f".dstx.tmp-{dead}"])


def test_stale_old_folder_is_restored_when_dst_is_missing(tmp_path, capfd):
    old = tmp_path / f".dst.old-{_dead_pid()}"
    old.mkdir()
    (old / "mine.txt").write_text("previous dst")
    rc, out, err = _run_main(capfd, ["to-jax", BASE / "model", tmp_path / "dst"])
    assert "restored" in out and rc == 2 and "already exists" in err, (out, err)
    assert (tmp_path / "dst" / "mine.txt").read_text() == "previous dst" and not old.exists()


# ------------------------------------------------------------------ signals at random moments
@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """(source, reference to-jax folder, its params, wall seconds of one conversion)."""
    from glm_jax.checkpoint.orbax import load_jax

    tmp = tmp_path_factory.mktemp("big")
    src = tmp / "src"
    build_checkpoint(src)
    ref = tmp / "ref"
    t = time.time()
    p = _convert(src, ref)
    rc = p.wait(timeout=300)
    assert rc == 0, p.stderr.read()
    return src, ref, load_jax(ref)[1], time.time() - t


def _convert(src, dst, *extra):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "convert.cli", "to-jax", str(src), str(dst), *extra]
    # A shell's background job starts with SIGINT ignored, and the converter rightly keeps an inherited SIG_IGN
    # (nohup semantics). The signal tests want an interruptible child, so it starts with SIGINT at its default.
    import signal

    before = signal.getsignal(signal.SIGINT)
    if before is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, before)


def _leftovers(dst):
    return [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


def _signal_at(src, dst, sig, delay=None, during_write=False):
    """Start a conversion and send `sig` after `delay` seconds, or once it has begun writing params plus `delay`."""
    p = _convert(src, dst)
    if during_write:
        t = time.time()
        while not any(q.name.startswith("params") for t in dst.parent.glob(f".{dst.name}.tmp-*") for q in t.iterdir()):
            assert p.poll() is None and time.time() - t < 120, "the conversion never started writing"
            time.sleep(0.005)
    time.sleep(delay or 0)
    sent = time.time()
    with contextlib.suppress(ProcessLookupError):
        p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    return p.returncode, out, err, time.time() - sent


def _assert_complete_or_absent(dst, ref_params):
    from glm_jax.checkpoint.orbax import load_jax

    if dst.exists():
        assert same_params(load_jax(dst)[1], ref_params)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_interrupt_leaves_nothing_half_written(big, tmp_path, signame):
    import signal

    src, _, ref_params, wall = big
    sig = getattr(signal, signame)
    rng = np.random.default_rng(1234 + sig)
    runs = [(float(rng.uniform(0.0, 0.3)), True)] + [(float(rng.uniform(0.4, 1.0)) * wall, False) for _ in range(2)]
    for i, (delay, during_write) in enumerate(runs):
        dst = tmp_path / f"dst{i}"
        rc, _, err, took = _signal_at(src, dst, sig, delay, during_write)
        assert "FATAL" not in err and "Traceback" not in err, err
        assert rc in (0, 128 + sig, -sig), (rc, err)
        if during_write:
            assert rc == 128 + sig and took < 30, (rc, took, err)
        if rc == 128 + sig:
            assert err.strip().splitlines() == ["error: interrupted"] and not dst.exists(), err
        assert not _leftovers(dst), _leftovers(dst)
        _assert_complete_or_absent(dst, ref_params)


def test_sigkill_then_rerun_clears_the_leftovers(big, tmp_path):
    import signal

    src, _, ref_params, wall = big
    rng = np.random.default_rng(99)
    for i, (delay, during_write) in enumerate([(float(rng.uniform(0.0, 0.3)), True), (0.7 * wall, False)]):
        dst = tmp_path / f"dst{i}"
        rc, _, _, _ = _signal_at(src, dst, signal.SIGKILL, delay, during_write)
        left = _leftovers(dst)
        if during_write:
            assert rc == -signal.SIGKILL and left, (rc, left)
        p = _convert(src, dst, "--overwrite")
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        said = [line for line in out.splitlines() if "cleared" in line]
        assert len(said) == (1 if left else 0) and all(name in said[0] for name in left), out
        assert not _leftovers(dst)
        _assert_complete_or_absent(dst, ref_params)
        assert dst.exists()
