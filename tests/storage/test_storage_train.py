"""glm-train with every path on gs:// (DESIGN §3.11), against the GCS emulator (tests/_gcs.py): `model`,
`data.source` and `output_dir` on the emulator give the losses of the same run on local copies, bit for bit; a
SIGTERM and a rerun resume exactly; `glm-train verify gs://...` passes; a flaky store (503/429, delays) changes
nothing; a bucket that starts refusing writes ends the run with exit 2, one `error:` line, and the last complete
checkpoint intact. No local folder named `gs:` ever appears."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
import time
import uuid

import pytest
from helpers import ROOT
from helpers.cli import subprocess_env
from helpers.gcs import FlakyProxy, no_gs_folder
from helpers.train_runs import CACHE, cli, losses, tiny, train

from glm_jax import storage
from glm_jax.data.sources import CORPUS_DIR
from train import verify

# a constant learning rate after warmup: `steps` changes no step's update, so a run stopped by SIGTERM and one
# told its length up front take the same steps
COMMON = ("schedule=constant", "checkpoint_every=100000", "progress=none", f"compilation_cache_dir={CACHE}")


@pytest.fixture(autouse=True)
def _no_gs_folder(gcs):
    yield
    assert not no_gs_folder(os.getcwd(), tempfile.gettempdir(), ROOT), "a gs:// URL was taken for a local path"


def _url(name: str) -> str:
    return f"gs://glm-test/train-{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def inputs(gcs, tmp_path_factory):
    """{"model", "data"}: a tiny pretrained base (a 2-step run; a run folder is a checkpoint folder) and the
    bundled corpus as a folder of .txt files, each locally and as a gs:// copy."""
    tmp = tmp_path_factory.mktemp("inputs")
    base = tmp / "base"
    train(tiny(base, "steps=2", "checkpoint_every=2"))
    corpus = tmp / "corpus"
    shutil.copytree(CORPUS_DIR, corpus, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    local = {"model": str(base), "data": str(corpus)}
    remote = {k: _url(k) for k in local}
    for k in local:
        storage.upload_folder(pathlib.Path(local[k]), remote[k])
    return local, remote


_refs = {}


def reference(inputs, tmp_path_factory, steps: int):
    """(losses, output folder) of the same run with every path local, uninterrupted for `steps` steps: a glm-train
    process like the runs it is compared with (in the test process, with its 8 host devices, XLA's CPU
    reductions may round the last bit otherwise)."""
    if steps not in _refs:
        out = tmp_path_factory.mktemp(f"ref{steps}")
        rc, _, err = _run(*args_for(out, inputs[0]), f"steps={steps}", *COMMON)
        assert rc == 0, err[-3000:]
        _refs[steps] = losses(out), out
    return _refs[steps]


def gs_losses(url) -> dict:
    recs = [json.loads(x) for x in storage.read_text(f"{url}/metrics.jsonl").splitlines() if x.strip()]
    steps = [r["step"] for r in recs]
    assert steps == sorted(set(steps)), f"duplicated or unordered metrics lines: {steps}"
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def complete_steps(url) -> list[int]:
    return [s for s, d in verify.step_dirs(storage.as_path(url) / "checkpoints") if verify.has_manifest(d)]


def args_for(url, remote):
    return ("--config", "tiny", f"output_dir={url}", f"model={remote['model']}", f"data.source={remote['data']}")


def _run(*args, env=None, timeout=300):
    p = subprocess.run(cli(*args), env=env or subprocess_env(1), capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def _wait_for(cond, proc, what, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if cond():
                return
        except OSError:  # not written yet
            pass
        time.sleep(0.3)
    assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()[0][-3000:]}"
    raise AssertionError(f"timed out waiting for {what}")


def test_train_on_gcs_sigterm_resume_verify(inputs, tmp_path_factory):
    _, remote = inputs
    url = _url("run")
    p = subprocess.Popen(
        cli(*args_for(url, remote), "steps=100000", *COMMON),
        env=subprocess_env(1),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for(lambda: len(gs_losses(url)) >= 3, p, "3 metrics lines on gs://")
        p.send_signal(signal.SIGTERM)
        log = p.communicate(timeout=180)[0]
    finally:
        p.kill()
    assert p.returncode == 0 and "SIGTERM" in log, log[-3000:]
    k = complete_steps(url)[-1]
    assert k >= 3
    rc, out, err = _run(*args_for(url, remote), f"steps={k + 2}", *COMMON, "progress=lines")
    assert rc == 0, err[-3000:]
    assert f"resumed from {url}/checkpoints/{k} (step {k})" in out
    got, (want, ref) = gs_losses(url), reference(inputs, tmp_path_factory, k + 2)
    assert sorted(got) == list(range(1, k + 3))
    assert got == want  # bit for bit: the same floats as the run on local paths
    assert complete_steps(url) == [k, k + 2]
    # the run folder is a checkpoint folder on GCS too: config.json, tokenizer, loss.png, TensorBoard events
    names = storage.listdir(url)
    assert {"config.json", "glm_sentencepiece.model", "loss.png", "metrics.jsonl", "tensorboard"} <= set(names)
    assert storage.read_bytes(f"{url}/loss.png")[:8] == b"\x89PNG\r\n\x1a\n"
    events = storage.listdir(f"{url}/tensorboard")
    assert events and all(n.startswith("events.out.tfevents") for n in events)
    for name in ("config.json", "glm_sentencepiece.model", "generation_config.json"):
        assert storage.read_bytes(f"{url}/{name}") == (ref / name).read_bytes(), name
    rc, out, err = _run("verify", url)
    assert rc == 0, out + err
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"step {k}: ok") and lines[1].startswith(f"step {k + 2}: ok")


def test_flaky_store_same_losses(gcs, inputs, tmp_path_factory):
    """503/429 on 3% of the requests and delays on a fifth: gcsfs's and TensorStore's retries carry the run,
    its stop and its resume through, with the losses of the local run."""
    _, remote = inputs
    proxy = FlakyProxy(gcs.port, fail=0.03, slow=0.2, delay=0.1, seed=1)  # each failure costs a 1-2 s backoff
    env = {**subprocess_env(1), **gcs.env(proxy.url)}
    url = _url("flaky")
    try:
        rc, out, err = _run(*args_for(url, remote), "steps=6", "stop_at=3", *COMMON, env=env)
        assert rc == 0, err[-3000:]
        rc, out, err = _run(*args_for(url, remote), "steps=6", *COMMON, "progress=lines", env=env)
        assert rc == 0, err[-3000:]
        assert f"resumed from {url}/checkpoints/3 (step 3)" in out
        rc, vout, verr = _run("verify", url, env=env)
        assert rc == 0, vout + verr
    finally:
        proxy.stop()
    assert proxy.counts["failed"] > 0 and proxy.counts["delayed"] > 0, proxy.counts
    assert gs_losses(url) == reference(inputs, tmp_path_factory, 6)[0]
    assert complete_steps(url) == [3, 6]


def test_bucket_refusing_writes_exit_2(gcs, inputs):
    """The store refuses every write once a step is complete: the run ends with exit 2 and one `error:` line
    naming the gs:// folder; the complete steps stay complete and verify, and a step whose save was cut short is
    never taken as complete: verify reports it, and a rerun sets it aside and resumes from the last good one."""
    _, remote = inputs
    proxy = FlakyProxy(gcs.port)
    env = {**subprocess_env(1), **gcs.env(proxy.url)}
    url = _url("refuse")
    args = (*args_for(url, remote), "schedule=constant", "checkpoint_every=2", "keep_checkpoints=100")
    args += ("progress=none", f"compilation_cache_dir={CACHE}")
    p = subprocess.Popen(cli(*args, "steps=100000"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: complete_steps(url), p, "a complete step")
        proxy.deny_writes = True
        out, err = p.communicate(timeout=240)
    finally:
        p.kill()
        proxy.stop()
    assert proxy.counts["denied"] > 0
    assert p.returncode == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and url in errors[0], err[-3000:]
    done = complete_steps(url)
    assert done
    rc, vout, verr = _run("verify", url)
    lines = vout.splitlines()
    ok = [int(x.split(":")[0].split()[1]) for x in lines if ": ok (" in x]
    cut = [x for x in lines if x not in [y for y in lines if ": ok (" in y]]
    assert ok == done and all("FAILED: no manifest (the save did not complete)" in x for x in cut), vout
    assert rc == (2 if cut else 0), vout + verr
    # the rerun (the store writable again) resumes from the last complete step and sets the cut step aside
    rc, out, err = _run(*args, f"steps={done[-1] + 2}", "progress=lines")
    assert rc == 0, err[-3000:]
    assert f"resumed from {url}/checkpoints/{done[-1]} (step {done[-1]})" in out
    assert len([x for x in out.splitlines() if x.startswith("warning: checkpoint step")]) == len(cut), out
    rc, vout, verr = _run("verify", url)
    assert rc == 0 and f"step {done[-1] + 2}: ok" in vout, vout + verr
