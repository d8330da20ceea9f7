"""from_pretrained(path, attention="flash"): the Pallas kernel (interpret mode on CPU) inside the model reproduces
every golden fixture's logits at the fixture tolerance, and a sharded train step's loss and gradients equal the
XLA attention's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.fixture_models import FIX, MODEL_FIXTURES, TOL, io, max_diff, reference_inputs

import glm_jax


def _flash_inputs(name, d):
    """The reference inputs with the padding mask as [B, T] (the kernel takes no dense mask)."""
    kw, real = reference_inputs(name, d)
    if name == "chatglm-6b":  # its fixture feeds a dense mask; the 2-D padding mask gives the same rule
        kw = {"attention_mask": real.astype(np.int32), "position_ids": d["position_ids"]}
    return kw, real


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_flash_logits_match_reference(name):
    d = io(name)
    kw, real = _flash_inputs(name, d)
    lm = glm_jax.from_pretrained(FIX / name / "model", attention="flash")  # P-Tuning prefixes: XLA attention
    logits = lm(d["input_ids"], **kw)
    assert max_diff(logits, d["logits"], real) <= TOL.get(name, 1e-4)


def test_flash_is_used_and_differs_from_a_wrong_mask():
    """The kernel path runs (a wrong prefix changes the logits) and equals the XLA path on the same inputs."""
    d = io("glm-original")
    kw, real = _flash_inputs("glm-original", d)
    xla = glm_jax.from_pretrained(FIX / "glm-original" / "model")
    flash = glm_jax.from_pretrained(FIX / "glm-original" / "model", attention="flash")
    a, b = xla(d["input_ids"], **kw), flash(d["input_ids"], **kw)
    assert max_diff(a, b, real) <= 1e-5
    wrong = flash(d["input_ids"], position_ids=kw["position_ids"], prefix_len=np.zeros_like(d["sep"]))
    assert max_diff(wrong, d["logits"], real) > 1e-3


def test_flash_train_step_on_a_mesh_matches_xla():
    """Loss and parameter gradients of the blank-infilling loss on a (data 2, fsdp 2, tensor 2) mesh, kernel vs
    XLA attention, GQA model (the kernel runs per shard under shard_map)."""
    from glm_jax.model.transformer import GLMModel, init_params
    from glm_jax.sharding import axis_rules, make_mesh, shard_params

    cfg = glm_jax.GLMConfig.preset("glm4_9b").replace(
        vocab_size=256,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        ffn_size=96,
        rope_dim=8,
    )
    B, T = 8, 40
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 256, (B, T)), jnp.int32)
    prefix = jnp.asarray(rng.integers(0, T + 1, (B,)), jnp.int32)
    pad = jnp.asarray(np.arange(T)[None] >= rng.integers(0, 6, (B, 1)), jnp.int32)  # left padding
    seg = jnp.asarray(np.cumsum(rng.random((B, T)) < 0.05, axis=1), jnp.int32)
    w = jnp.asarray(rng.standard_normal((B, T, 256)), jnp.float32)
    params = init_params(cfg, jax.random.PRNGKey(1))
    mesh = make_mesh(2, 2, 2)

    def run(attention):
        module = GLMModel(cfg.replace(attention=attention))

        def loss(p):
            logits = module.apply({"params": p}, ids, pad, None, prefix, segment_ids=seg)
            return jnp.mean(jax.nn.log_softmax(logits) * w)

        with jax.set_mesh(mesh), axis_rules():
            p = shard_params(params, cfg, mesh)
            return jax.jit(jax.value_and_grad(loss))(p)

    (lx, gx), (lf, gf) = run("xla"), run("flash")
    assert abs(float(lx) - float(lf)) <= 1e-5 * abs(float(lx))
    for a, b in zip(jax.tree.leaves(gx), jax.tree.leaves(gf)):
        scale = float(jnp.max(jnp.abs(a))) or 1.0
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-4 * scale
