"""A NaN in a batch never reaches the params: the jitted step reports it and keeps params and optimizer state."""

import jax
import jax.numpy as jnp
import numpy as np
from helpers.train_runs import checkpoint_steps, flat, load_params, metrics, tiny, train


def _setup(tmp_path):
    from glm_jax.model.transformer import GLMModel, param_shapes
    from train import optimizer
    from train import step as step_lib
    from train.trainer import model_config

    tc = tiny(tmp_path)
    cfg, _ = model_config(tc)
    rng = np.random.default_rng(0)  # numpy init: this test is about the step, not the initializer
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape).astype(s.dtype)), param_shapes(cfg))
    frozen = optimizer.frozen_mask(params, [])
    tx = optimizer.make_optimizer(tc, params, frozen)
    step = jax.jit(step_lib.make_train_step(GLMModel(cfg), tx, tc, optimizer.make_schedule(tc, 2), frozen))
    B, T = 4, 16
    batch = {
        "tokens": rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32),
        "targets": rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32),
        "loss_mask": np.ones((B, T), np.float32),
        "position_ids": np.broadcast_to(np.arange(T, dtype=np.int32), (B, 2, T)).copy(),
        "prefix_len": np.full((B,), 4, np.int32),
    }
    return step, step_lib.init_state(params, tx), batch


def _equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_nan_batch_is_skipped_inside_the_step(tmp_path):
    step, state, batch = _setup(tmp_path)
    state, m = step(state, batch)  # one good step first: Adam moments are non-zero
    assert int(m["skipped"]) == 0 and int(state["step"]) == 1
    before = jax.tree.map(np.asarray, state)
    for poison in ("loss_mask", "nan_logit_path"):
        bad = {k: v.copy() for k, v in batch.items()}
        if poison == "loss_mask":
            bad["loss_mask"][1, 3] = np.nan
        else:
            bad["loss_mask"][0, 0] = np.inf  # inf weight: loss inf, gradients inf/NaN
        state, m = step(state, bad)
        assert int(m["skipped"]) == 1
        assert not np.isfinite(float(m["loss"]))
        assert _equal(state["params"], before["params"]) and _equal(state["opt_state"], before["opt_state"])
        assert int(state["step"]) == 1  # the schedule does not advance either
    state, m = step(state, batch)  # and training goes on
    assert int(m["skipped"]) == 0 and int(state["step"]) == 2
    assert not _equal(state["params"], before["params"])


def test_nan_step_in_a_run_leaves_params_unchanged(tmp_path):
    out = tmp_path / "run"
    train(tiny(out, "steps=4", "checkpoint_every=1", "keep_checkpoints=10", "debug_nan_steps=[3]"))
    assert checkpoint_steps(out) == [1, 2, 3, 4]
    p2, p3, p4 = (flat(load_params(out, s)) for s in (2, 3, 4))
    assert all(np.array_equal(p2[k], p3[k]) for k in p2)
    assert not all(np.array_equal(p3[k], p4[k]) for k in p3)
    assert all(np.isfinite(v).all() for v in p4.values())
    rec = {r["step"]: r for r in metrics(out)}
    assert rec[3]["skipped_steps"] == 1 and rec[3]["loss"] is None
    assert rec[4]["skipped_steps"] == 0 and rec[4]["loss"] is not None
