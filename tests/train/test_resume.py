"""Stopping and resuming from the latest checkpoint gives exactly the losses of an uninterrupted run."""

import shutil

from helpers.train_runs import checkpoint_steps, losses, metrics, tiny, train


def test_resume_is_bit_exact(tmp_path):
    a, b, c = tmp_path / "uninterrupted", tmp_path / "resumed", tmp_path / "from_async_save"
    train(tiny(a, "steps=6", "mesh.data=2"))  # saves at 3 (asynchronously, mid-run) and 6
    assert checkpoint_steps(a) == [3, 6]
    train(tiny(b, "steps=6", "mesh.data=2", "stop_at=4"))
    assert checkpoint_steps(b)[-1] == 4  # stop_at saves where it stops
    assert max(losses(b)) == 4
    summary = train(tiny(b, "steps=6", "mesh.data=2"))
    assert summary["step"] == 6
    la, lb = losses(a), losses(b)
    assert sorted(lb) == [1, 2, 3, 4, 5, 6]
    assert [lb[s] for s in (5, 6)] == [la[s] for s in (5, 6)]  # bit-exact, not approximately equal
    assert lb == la
    assert [r["step"] for r in metrics(b)] == [1, 2, 3, 4, 5, 6]  # no duplicated lines after the resume
    # the step-3 checkpoint was written while steps 4-6 ran on the donated state: it holds step 3 exactly
    shutil.copytree(a, c)
    shutil.rmtree(c / "checkpoints" / "6")
    train(tiny(c, "steps=6", "mesh.data=2"))
    assert losses(c) == la
