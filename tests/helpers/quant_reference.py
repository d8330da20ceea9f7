"""The quantized models' reference side, written independently of glm_jax.quant: nibbles unpacked with integer
arithmetic, q · scale in numpy, and the logits comparison with its tolerance."""

import numpy as np

ATOL, RTOL_MAX = 1e-5, 1e-6


def close(a, b, real) -> bool:
    """|a - b| <= 1e-5 + 1e-6 · max|b| over the real tokens (float32 rounding grows with the logits' size:
    ChatGLM-6B's residual alpha 7.5 and large output projections give logits up to ~35 here)."""
    return float(np.abs(a - b)[real].max()) <= ATOL + RTOL_MAX * float(np.abs(b)[real].max())


def np_unpack(p, axis):
    p = np.moveaxis(np.asarray(p).astype(np.int32), axis, -1)
    hi = np.where(p & 0x80, (p >> 4) | ~0xF, p >> 4)  # sign-extended high nibble
    lo = np.where(p & 0x8, (p & 0xF) - 16, p & 0xF)
    out = np.stack([hi, lo], -1).reshape(p.shape[:-1] + (-1,))
    return np.moveaxis(out, -1, axis)


def dequantized(tree, bits):
    """A params tree with every (kernel int8, kernel_scale) pair replaced by the float32 kernel q · scale."""
    if not isinstance(tree, dict):
        return tree
    if "kernel_scale" in tree:
        q, s = np.asarray(tree["kernel"]), np.asarray(tree["kernel_scale"], np.float32)
        n_in = q.ndim - s.ndim
        q = np_unpack(q, n_in - 1) if bits == 4 else q.astype(np.int32)
        rest = {k: v for k, v in tree.items() if k not in ("kernel", "kernel_scale")}
        return {**rest, "kernel": (q.astype(np.float32) * s).astype(np.float32)}
    return {k: dequantized(v, bits) for k, v in tree.items()}
