"""The same logits with jit and without, scan on and off, remat, on a (2,2,2) mesh; bf16 close to fp32;
causality by gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.fixture_models import FIX, io, load, max_diff, reference_inputs

NAMES = ["glm-original", "chatglm-6b", "chatglm2-6b-ptuning-v2", "transformers-glm4", "transformers-glm4-moe"]


@pytest.mark.parametrize("name", NAMES)
def test_jit_scan_remat_and_mesh_agree_with_reference(name):
    import glm_jax
    from glm_jax import sharding

    d = io(name)
    kw, real = reference_inputs(name, d)
    tol = 5e-4 if name == "chatglm-6b" else 1e-4
    lm = load(name)
    eager = lm.module.apply({"params": lm.params}, d["input_ids"], **kw)  # no jit
    assert max_diff(eager, d["logits"], real) <= tol
    for over in ({"scan_layers": True}, {"scan_layers": True, "remat": "full"}, {"remat": "dots"}):
        v = glm_jax.from_pretrained(FIX / name / "model", **over)
        if over.get("scan_layers"):
            assert "layers" in v.params and "layers_0" not in v.params
        assert max_diff(v(d["input_ids"], **kw), d["logits"], real) <= tol, over
    # (2,2,2) mesh of 8 CPU devices, params sharded by the rules table, activations constrained
    mesh = sharding.make_mesh(2, 2, 2)
    cfg = lm.config.replace(scan_layers=True)
    params = sharding.shard_params(glm_jax.from_pretrained(FIX / name / "model", scan_layers=True).params, cfg, mesh)
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(params)}
    assert any("tensor" in s for s in specs) and any("fsdp" in s for s in specs), specs
    from glm_jax.model import GLMModel

    kwj = {k: jnp.asarray(v) for k, v in kw.items()}
    with jax.set_mesh(mesh), sharding.axis_rules():
        fn = jax.jit(lambda p, ids: GLMModel(cfg).apply({"params": p}, ids, **kwj))
        out = fn(params, jnp.asarray(d["input_ids"]))
        hlo = fn.lower(params, jnp.asarray(d["input_ids"])).as_text()
    assert "sharding" in hlo
    assert max_diff(out, d["logits"], real) <= tol


@pytest.mark.parametrize("name", ["transformers-glm", "chatglm2-6b", "glm-original"])
def test_bf16_compute_with_fp32_params_stays_close(name):
    import glm_jax

    d = io(name)
    kw, real = reference_inputs(name, d)
    lm = glm_jax.from_pretrained(FIX / name / "model", dtype="bfloat16", param_dtype="float32")
    assert jax.tree.leaves(lm.params)[0].dtype == jnp.float32
    out = lm(d["input_ids"], **kw)
    assert out.dtype == jnp.float32
    gap = max_diff(out, d["logits"], real)
    scale = float(np.abs(d["logits"]).max())
    # Measured on 2026-11-26: transformers-glm 0.029, chatglm2-6b 0.035 (|logits| up to ~4), glm-original 0.11
    # (|logits| up to 23): under 1% of the logit range; bf16 has an 8-bit mantissa (~0.4% per rounding).
    # Top-1 agreement was 100% on real tokens.
    assert 1e-4 < gap <= 0.05 * scale, gap
    agree = (np.argmax(out, -1) == np.argmax(d["logits"], -1))[real].mean()
    assert agree >= 0.9, agree


@pytest.mark.parametrize("name", ["transformers-glm4", "chatglm2-6b"])
def test_causality_by_gradient(name):
    """Logits at position t do not depend on inputs after t (causal families)."""
    lm = load(name)
    d = io(name)
    ids = d["input_ids"][:1]
    emb = lm.params["embed"]["embedding"]
    t = 5

    def out_t(e):
        p = dict(lm.params, embed={"embedding": e})
        return lm.module.apply({"params": p}, ids)[0, t].sum()

    # gradient w.r.t. the embedding rows of tokens after t must vanish unless that token also occurs at <= t
    g = np.asarray(jax.grad(out_t)(emb))
    later = set(ids[0, t + 1 :].tolist()) - set(ids[0, : t + 1].tolist())
    assert later and all(np.abs(g[i]).max() == 0 for i in later)
    earlier = set(ids[0, : t + 1].tolist())
    assert any(np.abs(g[i]).max() > 0 for i in earlier)


def test_glm_prefix_is_bidirectional():
    """GLM: inside Part A (key < sep) attention is bidirectional; Part B stays causal."""
    lm = load("glm-original")
    d = io("glm-original")
    ids, pos, sep = d["input_ids"][:1], d["position_ids"][:1], int(d["sep"][0])
    base = np.asarray(lm(ids, position_ids=pos, prefix_len=[sep]))
    ids2 = ids.copy()
    ids2[0, sep - 2] = 50  # change a Part A token: every earlier Part A position sees it
    out = np.asarray(lm(ids2, position_ids=pos, prefix_len=[sep]))
    assert np.abs(out[0, 0] - base[0, 0]).max() > 1e-3
    ids3 = ids.copy()
    ids3[0, sep + 3] = 50  # change a Part B token: earlier positions do not see it
    out = np.asarray(lm(ids3, position_ids=pos, prefix_len=[sep]))
    assert np.abs(out[0, : sep + 3] - base[0, : sep + 3]).max() == 0


def test_param_shapes_allocates_nothing_at_real_size():
    import glm_jax

    cfg = glm_jax.GLMConfig.preset("glm4_9b")
    shapes = glm_jax.param_shapes(cfg)
    n = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
    assert 9.3e9 < n < 9.5e9  # GLM-4-9B has 9.40B parameters
    assert shapes["layers_0"]["block"]["attn"]["k"]["kernel"].shape == (4096, 2, 128)


def test_chatglm2_32k_position_interpolation_is_recognised():
    """chatglm2-6b-32k divides positions by rope_ratio (not the base): positions 16·p then act like p."""
    import glm_jax
    from glm_jax.model.positions import apply_rope

    d = glm_jax.GLMConfig.preset("chatglm2_6b").to_hf()
    d.update(rope_ratio=16, _name_or_path="THUDM/chatglm2-6b-32k")
    c32 = glm_jax.GLMConfig.from_hf(d)
    assert c32.rope_position_scale == 16 and c32.rope_base == 10000.0
    c3 = glm_jax.GLMConfig.from_hf({**d, "_name_or_path": "THUDM/chatglm3-6b-32k"})
    assert c3.rope_position_scale == 1 and c3.rope_base == 160000.0
    base = glm_jax.GLMConfig.preset("chatglm2_6b")
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 2, 128))
    p = jnp.array([[0, 1, 5, 9]])
    np.testing.assert_allclose(apply_rope(x, 16 * p, c32), apply_rope(x, p, base), atol=1e-6)


@pytest.mark.parametrize("name", ["chatglm2-6b-ptuning-v2", "transformers-glm4"])
def test_greedy_generation_with_scanned_layers(name):
    """generate on a scan_layers model (its KV cache stacked [L, B, K, S, H], consumed by the scan as is)
    reproduces the reference's greedy ids and cached step logits."""
    import glm_jax

    d = io(name)
    _, real = reference_inputs(name, d)
    lm = glm_jax.from_pretrained(FIX / name / "model", scan_layers=True)
    assert lm.config.scan_layers
    new = d["generated_ids"].shape[1] - d["input_ids"].shape[1]
    out, scores = lm.generate(
        d["input_ids"], attention_mask=real.astype(np.int32), max_new_tokens=new, return_logits=True
    )
    np.testing.assert_array_equal(out, d["generated_ids"])
    assert np.abs(scores - d["generation_step_logits"]).max() <= 1e-4
