"""The CPU weight-only int8 / int4 matmul kernel (glm_jax/quant/cpu_kernel.py, an FFI custom call).

Expected side: XLA's dequantize-then-dot path (glm_jax.model.layers._xla_quantized_matmul, the path every other
platform and every gradient takes), itself checked against numpy with an unpacking written here from the spec's
nibble order.

Tolerance, from the arithmetic (Higham, Accuracy and Stability of Numerical Algorithms, §3.1): a float32 dot of K
terms, summed in any order, with or without FMA, is within γ_K · Σ_k |x_k|·|w_k| of the exact sum, where
γ_n = n·u / (1 - n·u) and u = 2^-24. One more rounding (dequantizing q·scale before the sum, or scaling the sum
after it) makes it γ_{K+1}. Two such float32 results are therefore within 2·γ_{K+1} · (|x| @ |q·scale|) of each
other, per output element; that is the bound used here, for every pair (kernel, XLA, numpy). It is rigorous, so
no CPU's rounding can break it. It is about 1.2e-7·K² times the mean |term| (0.13 at K = 1026, 1.4e-4 at K = 34),
while a wrong nibble, scale or row moves an output by about one term.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.fixture_models import FIX, io, reference_inputs

import glm_jax
from glm_jax.model.layers import _xla_quantized_matmul, quantized_matmul
from glm_jax.quant import cpu_kernel as quant_cpu

needs_kernel = pytest.mark.skipif(not quant_cpu.available(), reason="the CPU kernel did not build here")


def np_dequantize(q, bits):
    q = np.asarray(q).astype(np.int32)
    if bits == 4:  # byte j of a row holds element 2j in its high nibble, 2j+1 in its low one, both signed
        hi = np.where(q & 0x80, (q >> 4) | ~0xF, q >> 4)
        lo = np.where(q & 0x8, (q & 0xF) - 16, q & 0xF)
        q = np.stack([hi, lo], 1).reshape(-1, q.shape[1])
    return q.astype(np.float32)


def operands(rng, m, k, n, bits):
    x = rng.standard_normal((m, k)).astype(np.float32)
    q = rng.integers(-128, 128, (k // 2 if bits == 4 else k, n)).astype(np.int8)
    scale = (rng.random(n) * 0.05 + 1e-3).astype(np.float32)
    return x, q, scale


def gamma(n):
    """Higham's γ_n for float32: the relative bound on the rounding of n products and sums."""
    u = 2.0**-24
    return n * u / (1 - n * u)


def assert_close(got, want, x, q, scale, bits):
    """|got - want| <= 2·γ_{K+1} · (|x| @ |q·scale|) per element: two float32 dots of K terms (module docstring)."""
    w = np.abs(np_dequantize(q, bits)).astype(np.float64) * np.abs(scale).astype(np.float64)
    bound = 2 * gamma(x.shape[-1] + 1) * (np.abs(x).astype(np.float64) @ w)
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    err = np.abs(got - want)
    assert np.all(err <= bound), float((err / np.maximum(bound, np.finfo(np.float64).tiny)).max())


def uses_kernel(f, *args) -> bool:
    """Whether the traced computation calls the FFI kernel (anywhere, nested jaxprs included)."""
    found = []

    def walk(j):
        for e in j.eqns:
            if e.primitive.name == "ffi_call" and e.params.get("target_name") == quant_cpu.TARGET:
                found.append(e)
            for sub in jax.extend.core.jaxprs_in_params(e.params):
                walk(sub)

    walk(jax.make_jaxpr(f)(*args).jaxpr)
    return bool(found)


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m", [1, 3, 8, 17])
@pytest.mark.parametrize("k, n", [(384, 1024), (100, 77), (1026, 33), (64, 129), (34, 1)])
def test_kernel_matches_xla(bits, m, k, n):
    """The kernel (AVX-512 where the CPU has it, the portable loops always; one thread and the pool) against
    XLA's dequantize-then-dot, on odd N, K not a multiple of 16, N narrower than one vector."""
    x, q, scale = operands(np.random.default_rng(m * 1000 + k + n), m, k, n, bits)
    want = np.asarray(jax.jit(lambda x, q, s: _xla_quantized_matmul(x, q, s, 1, bits))(x, q, scale))
    assert_close(want, x @ (np_dequantize(q, bits) * scale), x, q, scale, bits)  # the reference against numpy
    for isa in (0, 1):
        for threads in (1, 2):
            f = jax.jit(lambda x, q, s, isa=isa, t=threads: quant_cpu.kernel_2d(x, q, s, bits, threads=t, isa=isa))
            assert_close(np.asarray(f(x, q, scale)), want, x, q, scale, bits)


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4])
def test_dispatch_in_the_layer(bits, monkeypatch):
    """quantized_matmul takes the kernel for float32 products of at most MAX_M rows on CPU, XLA's path above it,
    in bfloat16, and with GLM_JAX_QUANT_KERNEL=0; both give the same values. A [B, T, N, H] kernel layout (two
    in dims, as attention's output projection has) is flattened as the model's matmul does."""
    rng = np.random.default_rng(bits)
    n_heads, head, out = 3, 16, 40
    w = rng.integers(-7, 8, (n_heads, head, out)).astype(np.int8)
    q = quant_cpu_pack(w, bits)
    scale = (rng.random(out) * 0.1).astype(np.float32)
    in_last = head
    f = jax.jit(lambda x, q, s: quantized_matmul(x, q, s, 2, in_last))
    ref = jax.jit(lambda x, q, s: _xla_quantized_matmul(x, q, s, 2, bits))
    for rows in (1, 5, quant_cpu.MAX_M, quant_cpu.MAX_M + 1):
        x = rng.standard_normal((1, rows, n_heads, head)).astype(np.float32)
        assert uses_kernel(f, x, q, scale) == (rows <= quant_cpu.MAX_M), rows
        flat = lambda a, rows=rows: np.asarray(a).reshape(rows, -1)  # noqa: E731
        assert_close(flat(f(x, q, scale)), flat(ref(x, q, scale)), x.reshape(rows, -1), w_flat(q), scale, bits)
    x = rng.standard_normal((2, 3, n_heads, head)).astype(np.float32)
    assert not uses_kernel(f, x.astype(jnp.bfloat16), q, scale)
    monkeypatch.setenv("GLM_JAX_QUANT_KERNEL", "0")
    assert not uses_kernel(f, x, q, scale)


def quant_cpu_pack(w, bits):
    """[N, H, out] int values -> the in-memory kernel: int8 as is, int4 packed along H (high nibble first)."""
    if bits == 8:
        return w
    u = w.astype(np.uint8)
    return ((u[:, 0::2] << 4) | (u[:, 1::2] & 0xF)).astype(np.uint8).view(np.int8)


def w_flat(q):
    """The kernel as the product sees it: in dims merged (int4: rows of packed bytes, unpacked by np_dequantize)."""
    return np.asarray(q).reshape(-1, q.shape[-1])


@needs_kernel
def test_grad_vmap_loop():
    """Gradients (P-Tuning on a quantized base differentiates through the layers with respect to x) are XLA's;
    vmap (sequential) and lax.while_loop work."""
    rng = np.random.default_rng(0)
    x, q, scale = operands(rng, 4, 96, 50, 8)

    def loss(fn):
        return lambda x, s: jnp.sum(jnp.tanh(fn(x, q, s)))

    kern = lambda x, q, s: quantized_matmul(x, q, s, 1, 96)  # noqa: E731
    xla = lambda x, q, s: _xla_quantized_matmul(x, q, s, 1, 8)  # noqa: E731
    assert uses_kernel(kern, x, q, scale)
    for a, b in zip(jax.grad(loss(kern), (0, 1))(x, scale), jax.grad(loss(xla), (0, 1))(x, scale)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    xs = rng.standard_normal((3, 2, 96)).astype(np.float32)
    got = jax.jit(jax.vmap(lambda x: kern(x, q, scale)))(xs)
    assert_close(np.asarray(got).reshape(6, -1), np.asarray(xla(xs.reshape(6, -1), q, scale)), xs.reshape(6, -1), q,
                 scale, 8)  # fmt: skip

    def body2(c):
        i, v = c
        return i + 1, v + jnp.sum(kern(v, q, scale)) * 1e-3

    def body_ref(c):
        i, v = c
        return i + 1, v + jnp.sum(xla(v, q, scale)) * 1e-3

    run = lambda b: jax.jit(lambda x: jax.lax.while_loop(lambda c: c[0] < 5, b, (0, x))[1])(x)  # noqa: E731
    np.testing.assert_allclose(np.asarray(run(body2)), np.asarray(run(body_ref)), rtol=1e-5)


def test_tpu_lowering_keeps_xla(monkeypatch):
    """Lowered for TPU (e.g. compile_only from a CPU host), the same function has no custom call: the
    hardware's own product of the int8 operand."""
    if not quant_cpu.available():
        pytest.skip("the CPU kernel did not build here")
    rng = np.random.default_rng(1)
    x, q, scale = operands(rng, 2, 64, 32, 8)
    f = jax.jit(lambda x, q, s: quantized_matmul(x, q, s, 1, 64))
    assert uses_kernel(f, x, q, scale)
    ok = [jax.export.DisabledSafetyCheck.custom_call(quant_cpu.TARGET)]
    cpu = jax.export.export(f, platforms=("cpu",), disabled_checks=ok)(x, q, scale).mlir_module()
    tpu = jax.export.export(f, platforms=("tpu",), disabled_checks=ok)(x, q, scale).mlir_module()
    assert quant_cpu.TARGET in cpu
    assert quant_cpu.TARGET not in tpu and "dot_general" in tpu


def test_fallback_without_compiler(monkeypatch):
    """No compiler (or a failed build): one warning, XLA's path, the same values."""
    monkeypatch.setattr(quant_cpu, "_state", {})
    monkeypatch.setattr(quant_cpu, "_compiler", lambda: None)
    rng = np.random.default_rng(2)
    x, q, scale = operands(rng, 3, 40, 24, 8)
    f = lambda x, q, s: quantized_matmul(x, q, s, 1, 40)  # noqa: E731
    with pytest.warns(RuntimeWarning, match="kernel is unavailable .*no C\\+\\+ compiler"):
        assert not uses_kernel(f, x, q, scale)
    assert not uses_kernel(f, x, q, scale)  # warned once; still XLA's path
    want = _xla_quantized_matmul(x, q, scale, 1, 8)
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(x, q, scale)), np.asarray(want))


def test_build_into_cache(tmp_path, monkeypatch):
    """The build lands in $GLM_JAX_CACHE under a name keyed by the source and versions, atomically (no temporary
    left behind), and a second call reuses it."""
    if quant_cpu._compiler() is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setenv("GLM_JAX_CACHE", str(tmp_path))
    path = quant_cpu.build()
    assert path.parent == tmp_path and path.name.startswith("quant_matmul-") and path.suffix == ".so"
    mtime = path.stat().st_mtime_ns
    assert quant_cpu.build() == path and path.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", ["chatglm2-6b", "transformers-glm4"])
def test_model_kernel_equals_xla(name, bits, monkeypatch):
    """from_pretrained(quantize=) logits and greedy ids with the kernel (prefill of 2 x 12 tokens and the decode
    steps: both within MAX_M rows) equal those of XLA's path, within test_quant_model's logits tolerance."""
    lq = glm_jax.from_pretrained(FIX / name / "model", quantize=f"int{bits}")
    d = io(name)
    kw, real = reference_inputs(name, d)
    ids, am = d["input_ids"], d["attention_mask"]
    assert math.prod(ids.shape) <= quant_cpu.MAX_M

    def run():
        jax.clear_caches()  # the switch is read when a function is traced
        logits = np.asarray(lq(ids, **kw))
        return logits, np.asarray(lq.generate(ids, attention_mask=am, max_new_tokens=6, eos_token_id=[-1]))

    apply = lambda p: lq.module.apply({"params": p}, ids)  # noqa: E731
    assert uses_kernel(apply, lq.params)
    a, ga = run()
    monkeypatch.setenv("GLM_JAX_QUANT_KERNEL", "0")
    assert not uses_kernel(apply, lq.params)
    b, gb = run()
    assert float(np.abs(a - b)[real].max()) <= 1e-5 + 1e-6 * float(np.abs(b)[real].max())
    assert np.array_equal(ga, gb)
    jax.clear_caches()
