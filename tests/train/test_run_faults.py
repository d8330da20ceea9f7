"""Faults and lying inputs: damaged checkpoints are caught by their manifests, reported in one line, moved aside,
and the run resumes bit-exactly from the previous good one; runs of non-finite steps stop with exit 3 and keep
a last checkpoint that verifies and loads; bad hyperparameters and a changed model are refused with exit 2."""

import json
import shutil

import jax
import numpy as np
import pytest
from helpers.train_runs import checkpoint_steps, losses, tiny, train

RUN = ("steps=6", "checkpoint_every=2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted reference run (checkpoints 2, 4, 6) and the same run stopped at step 4 (2, 4)."""
    root = tmp_path_factory.mktemp("faults")
    ref, base = root / "reference", root / "stopped_at_4"
    train(tiny(ref, *RUN))
    train(tiny(base, *RUN, "stop_at=4"))
    assert checkpoint_steps(ref) == [2, 4, 6] and checkpoint_steps(base) == [2, 4]
    return ref, base


def _cli(run_main, *argv):
    """glm-train's main in this process: (exit code, stdout lines, stderr lines)."""
    from train.main import main

    r = run_main(main, *argv)
    return r.code, r.out.splitlines(), r.err.splitlines()


def _data_file(step_dir, item="params"):
    """The largest tensor-data file of an item (Orbax OCDBT data under d/)."""
    files = [f for f in (step_dir / item).rglob("*") if f.is_file() and f.parent.name == "d"]
    return max(files, key=_size)


def _size(f):
    return f.stat().st_size


def _truncate(d):
    f = _data_file(d)
    f.write_bytes(f.read_bytes()[: _size(f) // 2])


def _zero(d):
    f = _data_file(d, "opt_state")
    f.write_bytes(bytes(_size(f)))


def _delete(d):
    _data_file(d).unlink()


def _garbage_meta(d):
    (d / "meta" / "metadata").write_bytes(b"\x00\xffnot json{{")


def _flip(d):
    f = _data_file(d)
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x5A
    f.write_bytes(bytes(b))


def _no_params(d):
    shutil.rmtree(d / "params")


DAMAGE = [  # (how, what the one warning line must say)
    (_truncate, "bytes, the manifest says"),
    (_zero, "differs from its manifest hash"),
    (_delete, "is missing"),
    (_garbage_meta, "meta/metadata has"),
    (_flip, "differs from its manifest hash"),
    (_no_params, "params/ is missing"),
]


def test_every_step_has_a_manifest_that_verifies(runs, run_main):
    ref, _ = runs
    for s in (2, 4, 6):
        man = json.loads((ref / "checkpoints" / str(s) / "glm_manifest.json").read_text())
        assert man["step"] == s and man["data_state"]["batches"] == s and man["config"]["num_layers"] == 2
        assert any(k.startswith("params/") for k in man["files"]) and "meta/metadata" in man["files"]
    rc, out, err = _cli(run_main, "verify", str(ref))
    assert rc == 0 and not err
    assert [x.split(":")[0] for x in out] == ["step 2", "step 4", "step 6"]
    assert all("ok (" in x and "hashes match, loads" in x for x in out)


@pytest.mark.parametrize("damage,says", DAMAGE, ids=[d.__name__.strip("_") for d, _ in DAMAGE])
def test_a_damaged_checkpoint_is_set_aside_and_the_run_resumes_bit_exact(
    runs, tmp_path, run_main, capsys, damage, says
):
    ref, base = runs
    run = tmp_path / "run"
    shutil.copytree(base, run)
    damage(run / "checkpoints" / "4")
    rc, out, err = _cli(run_main, "verify", str(run))  # glm-train verify names the bad step, exit 2
    assert rc == 2 and out[0].startswith("step 2: ok") and out[1].startswith("step 4: FAILED") and says in out[1]
    assert len(err) == 1 and err[0].startswith("error:")
    capsys.readouterr()
    summary = train(tiny(run, *RUN))
    out, err = capsys.readouterr()
    warn = [x for x in (out + err).splitlines() if "failed verification" in x]
    assert len(warn) == 1, out + err
    assert warn[0].startswith(f"warning: checkpoint step 4 at {run / 'checkpoints' / '4'} failed verification: ")
    assert says in warn[0] and warn[0].endswith("; moved to checkpoints/corrupt-4")
    assert "Traceback" not in out + err
    assert (run / "checkpoints" / "corrupt-4").is_dir()
    assert summary["step"] == 6 and checkpoint_steps(run) == [2, 4, 6]
    assert losses(run) == losses(ref)  # every step, bit for bit (resumed from step 2)


def test_no_checkpoint_verifies_exit_2_and_nothing_moves(runs, tmp_path, run_main):
    _, base = runs
    run = tmp_path / "run"
    shutil.copytree(base, run)
    _flip(run / "checkpoints" / "4")
    _garbage_meta(run / "checkpoints" / "2")
    rc, out, err = _cli(run_main, *_args(run, "host_heap=system"))
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {run}: no checkpoint verifies (step 4: ") and "step 2: meta/metadata" in err[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]


def _args(run, *extra):
    from helpers.train_runs import CACHE

    return ["--config", "tiny", f"output_dir={run}", "progress=none", f"compilation_cache_dir={CACHE}", *RUN, *extra]


def test_consecutive_nan_steps_stop_with_exit_3_keeping_a_good_checkpoint(tmp_path, run_main):
    import glm_jax

    run = tmp_path / "run"
    rc, out, err = _cli(
        run_main,
        *_args(run, "steps=8", "max_skipped_steps=3", "debug_nan_steps=[4,5,6,7]", "host_heap=system"),
    )
    assert rc == 3, err
    assert len([x for x in out if x.startswith("warning: step")]) == 3  # steps 4, 5, 6: then it stops
    assert err == [
        "error: 3 consecutive steps had a non-finite loss or gradient (steps 4-6); stopped. "
        f"The last good checkpoint is step 4 at {run.absolute() / 'checkpoints' / '4'}"
    ]
    assert checkpoint_steps(run) == [2, 4]  # no checkpoint at the stop (step 6)
    assert max(losses(run)) == 6
    rc, out, _ = _cli(run_main, "verify", str(run))
    assert rc == 0 and len(out) == 2
    lm = glm_jax.from_pretrained(str(run))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(lm.params))
    from glm_jax.checkpoint.orbax import _step_dir

    assert _step_dir(run).name == "4"
    (run / "checkpoints" / "4" / "glm_manifest.json").unlink()  # the library reads the newest complete step
    assert _step_dir(run).name == "2"


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_learning_rate_exit_2(tmp_path, run_main, value):
    rc, out, err = _cli(run_main, *_args(tmp_path / "run", f"learning_rate={value}"))
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: learning_rate must be a finite number"), err
    assert not (tmp_path / "run").exists()


def test_resume_with_another_model_exit_2_naming_the_fields(runs, tmp_path, run_main):
    ref, _ = runs
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    rc, out, err = _cli(run_main, *_args(run, "steps=8", "model_overrides.num_layers=3", "host_heap=system"))
    assert rc == 2 and len(err) == 1, err
    assert "holds a run of another model (num_layers saved 2 now 3)" in err[0]
    assert "Traceback" not in "\n".join(out + err)
    assert checkpoint_steps(run) == [2, 4, 6] and not list((run / "checkpoints").glob("corrupt-*"))


def test_rotation_keeps_the_last_complete_step(tmp_path):
    from train.checkpointing import Checkpointer

    ck = Checkpointer(tmp_path, keep=2, async_save=False)
    for s in (1, 2, 3, 4, 5):
        (ck.directory / str(s)).mkdir(parents=True)
        if s <= 3:  # 4 and 5: committed, manifests still being written
            (ck.directory / str(s) / "glm_manifest.json").write_text("{}")
    ck.rotate()
    assert sorted(int(p.name) for p in ck.directory.iterdir()) == [3, 4, 5]
    ck.close()


def test_a_non_finite_state_is_never_saved(tmp_path):
    import jax.numpy as jnp

    from train.checkpointing import Checkpointer, TrainingStopped

    ck = Checkpointer(tmp_path, keep=2, async_save=False)
    state = {"step": jnp.array(3), "params": {"w": jnp.array([1.0, jnp.nan])}, "opt_state": {"m": jnp.zeros(2)}}
    with pytest.raises(TrainingStopped, match="at step 3 are not finite; not saved. No checkpoint was saved"):
        ck.save(3, state, {"step": 3, "config": {}})
    ck.close()
    assert not list(ck.directory.iterdir())
