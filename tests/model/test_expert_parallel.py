"""Expert parallelism (glm_jax/model/moe.py expert_parallel): the routed experts of the Glm4Moe fixture split over
a mesh 'expert' axis give the one-device logits, loss and gradients, also when routing sends every token to the
same experts (dropless: no capacity, nothing dropped); glm-train with mesh.expert gives the one-device losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.train_runs import GLM4_MOE, glm4_moe_run, metrics, train

import glm_jax
from glm_jax.sharding import axis_rules, make_mesh, shard_params


@pytest.fixture(scope="module")
def fixture_lm():
    return glm_jax.from_pretrained(GLM4_MOE)


def _skew(params, expert):
    """Every router's score bias +100 on one expert: each token's top-k then always holds it."""

    def f(path, x):
        if jax.tree_util.keystr(path).endswith("['score_bias']"):
            return x.at[..., expert].add(100.0)
        return x

    return jax.tree_util.tree_map_with_path(f, params)


@pytest.mark.parametrize(
    "mesh_shape, skew",
    [(dict(data=2, expert=4), False), (dict(fsdp=4, expert=2), True)],  # skew: every token routed to expert 5
    ids=["data2-expert4", "fsdp4-expert2-all-to-one-expert"],
)
def test_expert_parallel_matches_one_device(fixture_lm, mesh_shape, skew):
    cfg, params = fixture_lm.config, fixture_lm.params
    if skew:
        params = _skew(params, 5)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, 256, (8, 16)), jnp.int32)
    w = jnp.asarray(rng.standard_normal((8, 16, cfg.vocab_size)), jnp.float32)
    model = fixture_lm.module

    def loss(p):
        logits = model.apply({"params": p}, ids)
        return jnp.mean(jax.nn.log_softmax(logits) * w), logits

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (l1, logits1), g1 = step(params)
    mesh = make_mesh(**mesh_shape)
    with jax.set_mesh(mesh), axis_rules():
        p = shard_params(params, cfg, mesh)
        experts = [
            x for path, x in jax.tree_util.tree_leaves_with_path(p) if "['experts']" in jax.tree_util.keystr(path)
        ]
        X = mesh_shape["expert"]
        assert experts and all(x.addressable_shards[0].data.shape[0] == cfg.num_experts // X for x in experts)
        jaxpr = str(jax.make_jaxpr(loss)(p))
        assert "all_gather" in jaxpr and "reduce_scatter" in jaxpr
        (l8, logits8), g8 = step(p)
    assert float(jnp.max(jnp.abs(logits8 - logits1))) <= 1e-4
    assert abs(float(l8) - float(l1)) <= 1e-4 * abs(float(l1))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g8)):
        scale = float(jnp.max(jnp.abs(a)))
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-4 * max(scale, 1e-6), jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_one")
    train(glm4_moe_run(out))
    return out


@pytest.mark.parametrize("mesh", [("mesh.data=2", "mesh.expert=4"), ("mesh.fsdp=4", "mesh.expert=2")], ids=str)
def test_glm_train_with_expert_axis_equals_one_device(tmp_path, one_device_run, mesh):
    one, ep = one_device_run, tmp_path / "ep"
    train(glm4_moe_run(ep, *mesh))
    m1 = [r for r in metrics(one) if "loss" in r]
    m8 = [r for r in metrics(ep) if "loss" in r]
    assert [r["step"] for r in m1] == [r["step"] for r in m8] == [1, 2]
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in m8], [r[key] for r in m1], rtol=1e-4, err_msg=key)
