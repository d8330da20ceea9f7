"""Context parallelism (glm_jax/model/context.py): the sequence split over a 'context' mesh axis, load-balanced,
gives the one-device XLA attention's logits, loss and gradients; the balanced order is the documented permutation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import glm_jax
from glm_jax.model.context import from_balanced, to_balanced
from glm_jax.model.transformer import GLMModel, init_params
from glm_jax.sharding import axis_rules, make_mesh, shard_params


def test_balanced_order_is_early_and_late_chunk_per_device():
    """Written out by hand: T=16 over C=2 devices, chunks of 4: device 0 holds chunks 0 and 3, device 1 chunks 1, 2."""
    x = np.arange(16)[None]
    bal = np.asarray(to_balanced(jnp.asarray(x), 2))
    assert bal[0].tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11]
    assert np.asarray(from_balanced(jnp.asarray(bal), 2)).tolist() == x.tolist()
    y = np.arange(2 * 3 * 24).reshape(2, 3, 24)
    assert np.array_equal(np.asarray(from_balanced(to_balanced(jnp.asarray(y), 3, axis=-1), 3, axis=-1)), y)


def _tiny(preset, **kw):
    base = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, head_dim=16, ffn_size=96)
    return glm_jax.GLMConfig.preset(preset).replace(**{**base, **kw})


CASES = {
    # GQA, rotary, left padding, packed segments, GLM prefix (Part A bidirectional)
    "glm4": (_tiny("glm4_9b", num_kv_heads=2, rope_dim=8), True),
    # the original GLM: learned 2-D positions (block positions), per-example sep
    "glm": (_tiny("glm_large", num_kv_heads=4, max_position_embeddings=64), False),
}


@pytest.mark.parametrize("mesh_shape", [dict(data=2, context=4), dict(fsdp=2, context=2, tensor=2)])
@pytest.mark.parametrize("case", list(CASES))
def test_context_parallel_matches_one_device(case, mesh_shape):
    cfg, rotary = CASES[case]
    B, T = 4, 48  # T a multiple of 2 x context for both meshes; not a multiple of the kernel's blocks
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 256, (B, T)), jnp.int32)
    prefix = jnp.asarray([0, T, 13, 30], jnp.int32)  # none, all of it, mid-chunk, another chunk
    kw = {}
    if rotary:
        kw["attention_mask"] = jnp.asarray(np.arange(T)[None] >= np.array([[0], [3], [0], [9]]), jnp.int32)
        kw["segment_ids"] = jnp.asarray(np.cumsum(rng.random((B, T)) < 0.06, axis=1), jnp.int32)
    else:  # GLM's 2-D positions: Part A positions 0..sep-1, Part B at the mask's position with block positions
        pos = np.minimum(np.arange(T)[None], np.asarray(prefix)[:, None])
        blk = np.maximum(np.arange(T)[None] - np.asarray(prefix)[:, None] + 1, 0)
        kw["position_ids"] = jnp.asarray(np.stack([pos, blk], axis=1), jnp.int32)
    w = jnp.asarray(rng.standard_normal((B, T, 256)), jnp.float32)
    params = init_params(cfg, jax.random.PRNGKey(1))

    def loss_fn(module):
        def loss(p):
            logits = module.apply({"params": p}, ids, kw.get("attention_mask"), kw.get("position_ids"), prefix,
                                  segment_ids=kw.get("segment_ids"))  # fmt: skip
            return jnp.mean(jax.nn.log_softmax(logits) * w), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    (l1, logits1), g1 = loss_fn(GLMModel(cfg.replace(attention="xla")))(params)  # one device, dense mask
    mesh = make_mesh(**mesh_shape)
    with jax.set_mesh(mesh), axis_rules():
        p = shard_params(params, cfg, mesh)
        (l8, logits8), g8 = loss_fn(GLMModel(cfg.replace(attention="flash")))(p)
    assert abs(float(l8) - float(l1)) <= 1e-4 * abs(float(l1))
    assert float(jnp.max(jnp.abs(logits8 - logits1))) <= 1e-4
    top = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(g1))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g8)):
        name = jax.tree_util.keystr(path)
        if not rotary and name.endswith("['k']['bias']"):  # unrotated: a constant per query row, softmax ignores it
            assert max(float(jnp.max(jnp.abs(a))), float(jnp.max(jnp.abs(b)))) <= 1e-9 * top, name
            continue
        scale = float(jnp.max(jnp.abs(a)))
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-4 * scale, name


def test_context_parallel_gathers_kv_and_runs_the_kernel_on_two_chunks():
    """The traced program all-gathers K/V over the context axis and calls the kernel on [B/2, 6]-query chunks
    (48 tokens / 4 devices = 12, two chunks of 6, padded to 8 rows) against all 48 keys."""
    cfg = CASES["glm4"][0].replace(attention="flash")
    ids = jnp.zeros((4, 48), jnp.int32)
    params = init_params(cfg, jax.random.PRNGKey(1))
    mesh = make_mesh(data=2, context=4)
    with jax.set_mesh(mesh), axis_rules():
        p = shard_params(params, cfg, mesh)
        jaxpr = str(jax.make_jaxpr(lambda p: GLMModel(cfg).apply({"params": p}, ids))(p))
    assert "all_gather" in jaxpr
    assert jaxpr.count("pallas_call") == 2 * cfg.num_layers
    # the kernel's output per chunk [B/2, N, 8, H]; K and V gathered to all 48 positions [B/2, 48, K, H]
    assert "f32[2,4,8,16]" in jaxpr and "f32[2,48,2,16] = all_gather" in jaxpr


def test_sequence_not_divisible_by_twice_the_context_is_refused():
    cfg = CASES["glm4"][0].replace(attention="flash")
    params = init_params(cfg, jax.random.PRNGKey(1))
    mesh = make_mesh(data=2, context=4)
    with jax.set_mesh(mesh), axis_rules(), pytest.raises(ValueError, match="divisible by 8"):
        GLMModel(cfg).apply({"params": shard_params(params, cfg, mesh)}, jnp.zeros((2, 44), jnp.int32))
