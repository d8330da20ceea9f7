"""The tiled grouped matmul for CPU (glm_jax/model/grouped_matmul.py) against jax.lax.ragged_dot (XLA's own grouped
matmul, the path TPU programs keep) and a numpy loop over the groups: values and gradients, on group layouts with
empty groups, groups that start and end inside a row tile, rows past the last group, and fewer rows than a tile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.model import grouped_matmul as gm

LAYOUTS = {
    "empty groups, boundaries inside tiles": (300, [0, 70, 1, 129, 50]),  # 250 of 300 rows grouped: 50 rows give 0
    "one group holds all": (64, [64, 0, 0]),
    "boundaries on tile edges": (384, [128, 0, 128, 128]),
    "fewer rows than a tile": (5, [2, 0, 3]),
    "every group empty": (40, [0, 0, 0, 0]),
    "many small groups": (1000, [37, 5, 0, 211, 1, 1, 128, 300, 17, 0, 100]),
}


def _numpy(a, w, sizes):
    out = np.zeros((a.shape[0], w.shape[-1]), np.float64)
    start = 0
    for g, n in enumerate(sizes):
        out[start : start + n] = a[start : start + n].astype(np.float64) @ w[g].astype(np.float64)
        start += n
    return out


def _gamma(n, u=2.0**-24):
    """Higham's γ_n (Accuracy and Stability of Numerical Algorithms, §3.1): a dot of n terms summed in any order in
    the precision of unit roundoff u is within γ_n · Σ|terms| of the exact sum."""
    return n * u / (1 - n * u)


def _bounds(a, w, ct, sizes):
    """Per-element bounds on |float32 result - exact| for y = a_g @ w_g, da = ct_g @ w_gᵀ and dw_g = a_gᵀ @ ct_g:
    γ_n times the same products of absolute values (n: the length of each sum: K, N, the group's rows)."""
    a, w, ct = (np.abs(x).astype(np.float64) for x in (a, w, ct))
    y, da, dw = np.zeros((a.shape[0], w.shape[-1])), np.zeros(a.shape), np.zeros(w.shape)
    start = 0
    for g, n in enumerate(sizes):
        rows = slice(start, start + n)
        y[rows] = _gamma(w.shape[1]) * (a[rows] @ w[g])
        da[rows] = _gamma(w.shape[2]) * (ct[rows] @ w[g].T)
        dw[g] = _gamma(n) * (a[rows].T @ ct[rows])
        start += n
    return y, da, dw


def _assert_within(got, want, bound):
    err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    assert np.all(err <= bound), float((err - bound).max())


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_tiled_equals_ragged_dot_values_and_grads(name):
    M, sizes = LAYOUTS[name]
    G, K, N = len(sizes), 24, 40
    rng = np.random.default_rng(len(name))
    a = rng.normal(size=(M, K)).astype(np.float32)
    w = rng.normal(size=(G, K, N)).astype(np.float32)
    ct = rng.normal(size=(M, N)).astype(np.float32)
    s = jnp.asarray(sizes, jnp.int32)

    def run(tiled):
        def f(a, w):
            y = gm.grouped_matmul(a, w, s, preferred_element_type=jnp.float32, tiled=tiled)
            return jnp.sum(y * ct), y

        (_, y), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(a, w)
        return np.asarray(y), [np.asarray(g) for g in grads]

    y, (da, dw) = run(True)
    y_ref, (da_ref, dw_ref) = run(False)
    # tolerances from the arithmetic: a float32 result is within its bound b of the exact value, so two float32
    # results are within 2b of each other; numpy's float64 sum is exact to ~1e-16 (its own γ_K, added)
    by, bda, bdw = _bounds(a, w, ct, sizes)
    _assert_within(y, _numpy(a, w, sizes), by * (1 + _gamma(K, 2.0**-53) / _gamma(K)))
    _assert_within(y, y_ref, 2 * by)
    _assert_within(da, da_ref, 2 * bda)
    _assert_within(dw, dw_ref, 2 * bdw)
    assert not y[sum(sizes) :].any() and not da[sum(sizes) :].any()  # rows outside every group


def test_bfloat16_operands_with_float32_products():
    M, sizes, K, N = 200, [90, 0, 110], 32, 16
    rng = np.random.default_rng(3)
    a = jnp.asarray(rng.normal(size=(M, K)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(3, K, N)), jnp.bfloat16)
    s = jnp.asarray(sizes, jnp.int32)
    y = gm.grouped_matmul(a, w, s, preferred_element_type=jnp.float32, tiled=True)
    ref = jax.lax.ragged_dot(a, w, s, preferred_element_type=jnp.float32)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-4 * float(jnp.abs(ref).max()), rtol=0)


def test_the_cpu_program_takes_the_tile_loop_and_others_ragged_dot():
    a, w, s = jnp.ones((16, 4)), jnp.ones((2, 4, 3)), jnp.asarray([10, 6], jnp.int32)
    cpu = str(jax.make_jaxpr(lambda: gm.grouped_matmul(a, w, s))())
    forced = str(jax.make_jaxpr(lambda: gm.grouped_matmul(a, w, s, tiled=False))())
    assert jax.default_backend() == "cpu"
    assert "ragged_dot" not in cpu and "bwd=_tiled_bwd" in cpu  # the tile loop's custom_vjp
    assert "ragged_dot" in forced and "_tiled" not in forced


def test_a_program_for_a_tpu_topology_keeps_ragged_dot():
    """An AOT compile for a TPU slice (compile_only on this host) prices ragged_dot, the MXU's grouped matmul."""
    from jax.sharding import Mesh

    from train.aot import topology_devices

    _, _, devices = topology_devices("v5p:2x2x1")
    a, w, s = jnp.ones((16, 4)), jnp.ones((2, 4, 3)), jnp.asarray([10, 6], jnp.int32)
    with jax.set_mesh(Mesh(np.asarray(devices).reshape(-1), ("fsdp",))):
        tpu = str(jax.make_jaxpr(lambda: gm.grouped_matmul(a, w, s))())
    assert "ragged_dot" in tpu and "_tiled" not in tpu
