"""Hand-written gradients of the model's building blocks against PyTorch autograd on the same inputs.

LayerNorm / RMSNorm (glm_jax.model.layers.norm) and the attention softmax (glm_jax.model.attention.softmax)
carry custom VJPs for speed; here their values and their gradients for every input (x, scale, bias) are
compared with torch.nn.functional's layer_norm, rms_norm and softmax under torch autograd.
"""

import numpy as np
import pytest
import torch


def _close(ours, ref, name):
    ours, ref = np.asarray(ours, np.float64), ref.detach().double().numpy()
    assert ours.shape == ref.shape, name
    assert np.abs(ours - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max()), (name, np.abs(ours - ref).max())


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_norm_value_and_grads_match_torch(kind, param_dtype):
    import jax
    import jax.numpy as jnp

    from glm_jax.model.layers import Norm

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 5, 48)) * 2 + 0.5).astype(np.float32)
    g = rng.standard_normal((3, 5, 48)).astype(np.float32)
    scale = (1 + 0.3 * rng.standard_normal(48)).astype(np.float32)
    bias = (0.2 * rng.standard_normal(48)).astype(np.float32)
    if param_dtype == "bfloat16":  # exactly representable, so torch sees the same values in float32
        scale = np.asarray(jnp.asarray(scale, jnp.bfloat16).astype(jnp.float32))
        bias = np.asarray(jnp.asarray(bias, jnp.bfloat16).astype(jnp.float32))
    params = {"scale": jnp.asarray(scale, param_dtype)}
    if kind == "layernorm":
        params["bias"] = jnp.asarray(bias, param_dtype)
    mod = Norm(kind, 1e-5, param_dtype=param_dtype)
    y, vjp = jax.vjp(lambda p, x: mod.apply({"params": p}, x), params, jnp.asarray(x))
    dp, dx = vjp(jnp.asarray(g))
    assert dp["scale"].dtype == params["scale"].dtype

    xt = torch.tensor(x, requires_grad=True)
    st = torch.tensor(scale, requires_grad=True)
    bt = torch.tensor(bias, requires_grad=True)
    if kind == "layernorm":
        yt = torch.nn.functional.layer_norm(xt, (48,), st, bt, eps=1e-5)
    else:
        yt = torch.nn.functional.rms_norm(xt, (48,), st, eps=1e-5)
    yt.backward(torch.tensor(g))
    _close(y, yt, "y")
    _close(dx, xt.grad, "dx")
    tol = 1e-5 if param_dtype == "float32" else 1e-2  # the bf16 param grads are rounded to bf16
    for ours, ref, name in [(dp["scale"], st.grad, "dscale")] + (
        [(dp["bias"], bt.grad, "dbias")] if kind == "layernorm" else []
    ):
        ours, ref = np.asarray(ours.astype(jnp.float32)), ref.numpy()
        assert np.abs(ours - ref).max() <= tol * max(1.0, np.abs(ref).max()), name


def test_attention_softmax_value_and_grad_match_torch():
    import jax
    import jax.numpy as jnp

    from glm_jax.model.attention import NEG, softmax

    rng = np.random.default_rng(1)
    s = (rng.standard_normal((2, 3, 16, 16)) * 4).astype(np.float32)
    s = np.where(np.tril(np.ones((16, 16), bool)), s, NEG).astype(np.float32)  # masked as attend masks them
    g = rng.standard_normal(s.shape).astype(np.float32)
    p, vjp = jax.vjp(softmax, jnp.asarray(s))
    (ds,) = vjp(jnp.asarray(g))
    st = torch.tensor(s, requires_grad=True)
    pt = torch.softmax(st, dim=-1)
    pt.backward(torch.tensor(g))
    _close(p, pt, "p")
    _close(ds, st.grad, "ds")
