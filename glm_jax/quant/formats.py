"""The formats: ChatGLM's int8 / int4 storage rule, packing and unpacking int4, and dequantizing q · scale.

Storage (the reference's `model.half().quantize(bits)`): a linear's [out, in] weight is cast to float16; per
output row, scale = max|w| / (2^(bits-1) - 1) in float16; q = round(w / scale) with the division in float16 and
round half to even, stored as int8, for 4 bits packed two per byte along `in`, element 2j in the high nibble
(byte j = (q[2j] << 4) | (q[2j+1] & 0xF)). Dequantized: w = q · scale.

In memory, a quantized Dense holds `kernel` as int8 in our [in..., out...] layout (for 4 bits the last in-dim
halved: the same bytes as the checkpoint, transposed) beside `kernel_scale` [out...]. Quantization at load uses
the same layout with float32 per-output-channel scales (max|w| / qmax over the in dims) and the same rounding.

`unpack_int4` and `dequantize` take numpy or jax arrays alike (the same shifts and products in both), so the
host-side readers and the jitted model share one definition.
"""

from __future__ import annotations

import numpy as np

BITS = (4, 8)
NAMES = {"int8": 8, "int4": 4}
SCALE = "kernel_scale"  # a quantized kernel's per-output-channel scale, beside it in the params


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def check_bits(bits) -> int:
    if bits not in BITS:
        raise ValueError(f"quantization bits must be 4 or 8, got {bits!r}")
    return bits


# ------------------------------------------------------------------ int4 nibbles
def pack_int4(q: np.ndarray, axis: int = -1) -> np.ndarray:
    """int8 values in -8..7 -> int8 bytes, pairs along `axis` (even length): element 2j the high nibble."""
    q = np.moveaxis(np.asarray(q, np.int8), axis, -1)
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of input features, got {q.shape[-1]}")
    u = q.view(np.uint8)
    packed = ((u[..., 0::2] << 4) | (u[..., 1::2] & 0xF)).astype(np.uint8).view(np.int8)
    return np.ascontiguousarray(np.moveaxis(packed, -1, axis))


def unpack_int4(p, axis: int = -1):
    """Inverse of pack_int4: each byte -> (high nibble, low nibble), both sign-extended, along `axis` (doubled).
    numpy in, numpy out; jax in, jax out."""
    xp = _namespace(p)
    p = p if xp is not np else np.asarray(p, np.int8)
    axis = axis % p.ndim
    hi = xp.right_shift(p, xp.int8(4))
    lo = xp.right_shift(xp.left_shift(p, xp.int8(4)), xp.int8(4))
    both = xp.stack([hi, lo], axis=axis + 1)
    return both.reshape(p.shape[:axis] + (2 * p.shape[axis],) + p.shape[axis + 1 :])


def dequantize(q, scale, bits: int, *, lead: int = 0, dtype=np.float32):
    """q · scale of a quantized kernel [lead..., in..., out...] (4 bits: its last in-dim packed) with scale
    [lead..., out...], in `dtype`: the float kernel it stands for. `lead` counts leading axes that both share (a
    scan_layers stack's layer axis). numpy or jax arrays alike."""
    xp = _namespace(q)
    n_in = q.ndim - scale.ndim
    if bits == 4:
        q = unpack_int4(q, lead + n_in - 1)
    s = xp.expand_dims(xp.asarray(scale).astype(dtype), tuple(range(lead, lead + n_in)))
    return q.astype(dtype) * s


def _namespace(a):
    """numpy for host arrays, jax.numpy for jax arrays and tracers."""
    if isinstance(a, np.ndarray | np.generic):
        return np
    import jax.numpy as jnp

    return jnp


# ------------------------------------------------------------------ ChatGLM's storage rule
def quantize_rows(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(weight, weight_scale) as the reference stores a [out, in] linear after `model.half().quantize(bits)`:
    int8 [out, in] (4 bits: [out, in/2] packed) and float16 [out]. Every step is a float16 operation as in torch
    (float16 inputs computed in float32 and rounded once: exact for division, max and round)."""
    check_bits(bits)
    w16 = np.asarray(w).astype(np.float16)
    if w16.ndim != 2:
        raise ValueError(f"expected a 2-D [out, in] weight, got shape {w16.shape}")
    scale = (np.abs(w16).max(axis=-1).astype(np.float32) / np.float32(qmax(bits))).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (w16.astype(np.float32) / scale[:, None].astype(np.float32)).astype(np.float16)
    q = np.nan_to_num(np.rint(ratio.astype(np.float32)), nan=0.0).astype(np.int8)  # rint: half to even
    return (pack_int4(q) if bits == 4 else q), scale


# ------------------------------------------------------------------ our [in..., out...] kernels
def quantize_kernel(k: np.ndarray, n_in: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Weight-only quantization at load: kernel [in..., out...] -> (int8 kernel, float32 scale [out...]); scale =
    max|k| over the in dims / qmax, q = round half to even of k / scale; 4 bits packed along the last in-dim."""
    check_bits(bits)
    k = np.asarray(k, np.float32)
    scale = np.abs(k).max(axis=tuple(range(n_in))) / np.float32(qmax(bits))
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.clip(np.rint(k / safe), -qmax(bits), qmax(bits)).astype(np.int8)
    return (pack_int4(q, n_in - 1) if bits == 4 else q), scale.astype(np.float32)


def scale_path(kernel_path: str) -> str:
    """The path of a quantized kernel's scale (`.../kernel` -> `.../kernel_scale`)."""
    return kernel_path[: -len("kernel")] + SCALE
