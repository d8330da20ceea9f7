"""Weight-only quantization: ChatGLM's int8 / int4 storage rule and the in-memory quantized kernels.

Storage (specs/CHATGLM_ARCH.md §8, the reference's `model.half().quantize(bits)`): a linear's [out, in] weight
is cast to float16; per output row, scale = max|w| / (2^(bits-1) - 1) in float16; q = round(w / scale) with the
division in float16 and round half to even, stored as int8, for 4 bits packed two per byte along `in`, element
2j in the high nibble (byte j = (q[2j] << 4) | (q[2j+1] & 0xF)). Dequantized: w = q · scale.

In memory, a quantized Dense holds `kernel` as int8 in our [in..., out...] layout (for 4 bits the last in-dim
halved: the same bytes as the checkpoint, transposed) and `kernel_scale` [out...]; the model dequantizes inside
the jitted matmul (glm_jax/model/layers.py). Quantization at load (`from_pretrained(..., quantize=)`) uses the
same layout with float32 per-output-channel scales (max|w| / qmax over the in dims) and the same rounding.

Why not qwix / aqtp: qwix's PTQ quantizes float weights itself by its own rules, at trace time, into its own
QArray params, on dot_generals whose operand is a param. It cannot take ChatGLM's stored int8 / packed int4
values and float16 scales as they are, and our Dense reshapes the kernel before its dot_general. What we take
from qwix is its weight-only int8 matmul: the int8 weight converted to the compute dtype inside the jitted
product (on TPU a bf16 or int8 MXU operand fused into the dot, never a float32 copy of the weights in HBM) and
the per-channel scale applied to the product's output.
"""

from __future__ import annotations

import numpy as np

BITS = (4, 8)
NAMES = {"int8": 8, "int4": 4}


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


def unpack_int4(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Inverse of pack_int4: each byte -> (high nibble, low nibble), both sign-extended, along `axis`."""
    p = np.moveaxis(np.asarray(p, np.int8), axis, -1)
    hi = p >> 4
    lo = (p << 4).astype(np.int8) >> 4
    out = np.stack([hi, lo], axis=-1).reshape(p.shape[:-1] + (2 * p.shape[-1],))
    return np.ascontiguousarray(np.moveaxis(out, -1, axis))


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


def dequantize_rows(weight: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """float32 [out, in] = q · scale of a stored (weight, weight_scale) pair."""
    q = unpack_int4(weight) if bits == 4 else np.asarray(weight)
    return q.astype(np.float32) * np.asarray(scale).astype(np.float32)[:, None]


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


def dequantize_kernel(q: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """float32 kernel [in..., out...] = q · scale of an in-memory quantized kernel (4 bits: unpacked first)."""
    q = unpack_int4(q, kernel_n_in(np.shape(q), np.shape(scale)) - 1) if bits == 4 else np.asarray(q)
    return q.astype(np.float32) * np.asarray(scale, np.float32)


def kernel_n_in(kernel_shape, scale_shape) -> int:
    """Number of leading in-dims of a kernel whose trailing dims are the scale's (its out dims)."""
    return len(kernel_shape) - len(scale_shape)
