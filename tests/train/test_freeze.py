"""freeze=[patterns]: matching params stay bit-identical through training; the rest train."""

import jax
import numpy as np
import pytest
from helpers.train_runs import checkpoint_steps, flat, load_params, tiny, train


def test_frozen_params_are_bit_identical(tmp_path):
    from train.trainer import Run

    out = tmp_path / "run"
    keys = ("steps=3", "freeze=[embed/*, layers_0/block/attn]", "weight_decay=0.5")
    init_run = Run(tiny(tmp_path / "init", *keys))  # the exact initial state the run starts from
    init = flat(jax.tree.map(np.asarray, init_run.state["params"]))
    train(tiny(out, *keys))
    final = flat(load_params(out, checkpoint_steps(out)[-1]))
    frozen = [k for k in init if k.startswith("embed/") or k.startswith("layers_0/block/attn/")]
    trained = [k for k in init if k not in frozen]
    assert frozen and trained
    for k in frozen:
        assert np.array_equal(init[k], final[k]), k
        assert init[k].tobytes() == final[k].tobytes(), k
    assert all(not np.array_equal(init[k], final[k]) for k in trained if k.endswith("kernel"))


def test_freeze_pattern_that_matches_nothing_is_bad_input(tmp_path):
    from train.config import TrainConfigError

    with pytest.raises(TrainConfigError, match="matches no parameter"):
        train(tiny(tmp_path / "run", "freeze=[no_such_param/*]"))


def test_frozen_params_get_no_gradient(tmp_path):
    """Step 1 from the same init and batch: freezing a set S and, in another run, its complement splits the full
    run's gradient in two, so grad_norm(S frozen)² + grad_norm(rest frozen)² = grad_norm(nothing frozen)². (Were
    frozen params only stopped outside the differentiated function, all three would report the full norm.)"""
    from helpers.train_runs import metrics

    def norm(name, *keys):
        train(tiny(tmp_path / name, "steps=1", *keys))
        return next(r["grad_norm"] for r in metrics(tmp_path / name) if "grad_norm" in r)

    full = norm("full")
    a = norm("a", "freeze=[embed/*, layers_0/*]")
    b = norm("b", "freeze=[layers_1/*, final_norm/*, pos_embed/*, block_pos_embed/*]")
    assert a < full and b < full
    np.testing.assert_allclose(a**2 + b**2, full**2, rtol=1e-5)
