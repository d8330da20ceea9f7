"""Small building blocks: logically partitioned params, norms, dense projections."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from glm_jax.quant import cpu_kernel
from glm_jax.quant.formats import unpack_int4

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name):
    return DTYPES[name] if isinstance(name, str) else name


def param(module: nn.Module, name: str, shape, axes, init, dtype):
    """A param with logical axis names attached (used by the sharding rules table)."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype_of(dtype))


def logical_axes(boxed_tree):
    """Tree of logical-name tuples from a tree of nn.Partitioned / LogicallyPartitioned boxes."""
    return jax.tree.map(
        lambda x: tuple(x.names) if isinstance(x, nn.Partitioned) else (None,) * jnp.ndim(x),
        boxed_tree,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )


def constrain(x, axes):
    return nn.with_logical_constraint(x, axes)


def matmul(x, w, n_in: int = 1, transpose_w: bool = False):
    """x [..., in...] · w [in..., out...] (or w [out..., in...] with transpose_w) → [..., out...], as one 2-D
    matrix product: the leading dims of x and the in/out dims of w are merged first (free reshapes of
    row-major arrays). The gradient of w is then a product over one contracted dim, not several; XLA:CPU
    otherwise transposes the [B, T, F] activation gradients for it (1.7x slower MLP backward, measured)."""
    lead, ins = x.shape[: x.ndim - n_in], x.shape[x.ndim - n_in :]
    k = math.prod(ins)
    outs = w.shape[: w.ndim - n_in] if transpose_w else w.shape[n_in:]
    w2 = w.reshape(-1, k) if transpose_w else w.reshape(k, -1)
    dims = ((1,), (1,)) if transpose_w else ((1,), (0,))
    y = jax.lax.dot_general(
        x.reshape(-1, k), w2, (dims, ((), ())), preferred_element_type=jnp.float32 if x.dtype == jnp.float32 else None
    )
    return y.reshape(lead + outs)


class Norm(nn.Module):
    """LayerNorm (with bias) or RMSNorm; statistics in float32, output in the compute dtype."""

    kind: str
    eps: float
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x_BTD):
        d = x_BTD.shape[-1]
        scale = param(self, "scale", (d,), ("norm",), nn.initializers.ones, self.param_dtype)
        x = x_BTD.astype(jnp.float32)
        if self.kind == "layernorm":
            bias = param(self, "bias", (d,), ("norm",), nn.initializers.zeros, self.param_dtype)
            y = norm(x, scale, bias, float(self.eps))
        else:
            y = norm(x, scale, None, float(self.eps))
        return y.astype(dtype_of(self.dtype))


def _normalize(x, eps, center):
    """(x̂, 1/σ) of float32 x over its last axis: LayerNorm's (x - mean)/σ, or RMSNorm's x/rms without center."""
    if center:
        x = x - jnp.mean(x, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    return x * rstd, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def norm(x, scale, bias, eps):
    """LayerNorm (bias given) or RMSNorm (bias None) of float32 x over its last axis, float32 out.

    The gradient is written out (dx = (ĝ - mean(ĝ) - x̂·mean(ĝ·x̂))/σ with ĝ = g·scale; no mean(ĝ) for RMSNorm):
    two row reductions, where autodiff of the formula gives five (the norms' share of the default train step's
    profile went from 33 to 15 ms)."""
    return _norm_fwd(x, scale, bias, eps)[0]


def _norm_fwd(x, scale, bias, eps):
    xh, rstd = _normalize(x, eps, bias is not None)
    y = xh * scale.astype(jnp.float32)
    return (y if bias is None else y + bias.astype(jnp.float32)), (xh, rstd, scale, bias)


def _norm_bwd(eps, res, g):
    xh, rstd, scale, bias = res
    lead = tuple(range(g.ndim - 1))
    gh = g * scale.astype(jnp.float32)
    dx = gh - xh * jnp.mean(gh * xh, axis=-1, keepdims=True)
    if bias is not None:
        dx = dx - jnp.mean(gh, axis=-1, keepdims=True)
    dscale = jnp.sum(g * xh, axis=lead).astype(scale.dtype)
    dbias = None if bias is None else jnp.sum(g, axis=lead).astype(bias.dtype)
    return dx * rstd, dscale, dbias


norm.defvjp(_norm_fwd, _norm_bwd)


class Dense(nn.Module):
    """y = x · kernel (+ bias), contracting the last `len(in_shape)` dims of x; kernel is [in..., out...]."""

    in_shape: tuple
    out_shape: tuple
    axes: tuple  # logical names of kernel dims (in..., out...)
    use_bias: bool
    dtype: str = "float32"
    param_dtype: str = "float32"
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x):
        dt = dtype_of(self.dtype)
        n_in = len(self.in_shape)
        if self.has_variable("params", "kernel_scale"):  # weight-only quantized (glm_jax/quant/)
            q, scale = self.get_variable("params", "kernel"), self.get_variable("params", "kernel_scale")
            y = quantized_matmul(x.astype(dt), q, scale, n_in, self.in_shape[-1])
        else:
            kernel = param(
                self,
                "kernel",
                self.in_shape + self.out_shape,
                self.axes,
                nn.initializers.normal(self.init_std),
                self.param_dtype,
            )
            y = matmul(x.astype(dt), kernel.astype(dt), n_in)
        if self.use_bias:
            bias = param(self, "bias", self.out_shape, self.axes[n_in:], nn.initializers.zeros, self.param_dtype)
            y = y + bias.astype(y.dtype)
        return y.astype(dt)


def quantized_matmul(x, q, scale, n_in: int, in_last: int):
    """x [..., in...] · (q · scale) with q an int8 kernel [in..., out...] (int4: the last in-dim packed, half of
    `in_last`) and scale [out...]: the int8 values enter the product in x's dtype inside the jitted computation
    (bf16 on TPU: an MXU operand fused into the dot, no float32 copy of the weights), the per-output scale
    multiplies the product's float32 output (the formats: glm_jax/quant/formats.py).

    On CPU, for the few-row products of decoding, a C++ kernel does the same product without the float copy of
    the weights (glm_jax/quant/cpu_kernel.py); XLA's path below stays the reference, the other platforms' path
    and the gradient."""
    bits = 4 if q.shape[n_in - 1] * 2 == in_last else 8
    y = cpu_kernel.matmul(x, q, scale, n_in, bits, functools.partial(_xla_quantized_matmul, n_in=n_in, bits=bits))
    return _xla_quantized_matmul(x, q, scale, n_in, bits) if y is None else y


def _xla_quantized_matmul(x, q, scale, n_in: int, bits: int):
    if bits == 4:
        q = unpack_int4(q, n_in - 1)
    y = matmul(x, q.astype(x.dtype), n_in)
    return (y.astype(jnp.float32) * scale.astype(jnp.float32)).astype(y.dtype)
