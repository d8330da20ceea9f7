"""Rotary position embeddings of the GLM families, by `GLMConfig.position_encoding`.

* rope_interleaved (ChatGLM2/3, GLM-4, Glm, Glm4): the first `rope_dim` dims of each head rotate as
  interleaved pairs (2i, 2i+1) by angle p·base^(-2i/rope_dim); the rest passes through.
* rope_half (ChatGLM-6B 1-D mode, Glm4Moe): rotate-half over the first `rope_dim` dims (j paired with
  j + rope_dim/2) with the position id; the rest passes through.
* rope_2d (ChatGLM-6B): the head splits into two blocks of `rope_dim` dims; the first rotates with the position
  id, the second with the block position id, each rotate-half style.
* learned: no rotation (the original GLM adds learned position tables to the embeddings instead).

ChatGLM-6B rounds the frequencies to float16 (`rope_fp16_freqs`). Which position ids the rotation sees when the
caller gives none is the separate `position_rule` (glm_jax/model/masks.py).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def inv_freq(cfg) -> np.ndarray:
    r = cfg.rope_dim
    f = (1.0 / (np.float32(cfg.rope_base) ** (np.arange(0, r, 2, dtype=np.float32) / np.float32(r)))).astype(np.float32)
    if cfg.rope_fp16_freqs:
        f = f.astype(np.float16).astype(np.float32)
    return f


def _angles(pos_BT, cfg):
    p = pos_BT.astype(jnp.float32)
    if cfg.rope_position_scale != 1.0:
        p = p / jnp.float32(cfg.rope_position_scale)
    return p[..., None] * jnp.asarray(inv_freq(cfg))  # [B, T, r/2]


def _rotate_interleaved(x, ang):
    # x [..., r] with pairs (2i, 2i+1); ang [B, T, r/2] broadcast over heads.
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
    x = x.astype(jnp.float32)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    y0 = x0 * cos - x1 * sin
    y1 = x1 * cos + x0 * sin
    return jnp.stack([y0, y1], axis=-1).reshape(x.shape)


def _rotate_half(x, ang):
    cos = jnp.cos(jnp.concatenate([ang, ang], -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([ang, ang], -1))[:, :, None, :]
    x = x.astype(jnp.float32)
    h = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)
    return x * cos + rot * sin


def apply_rope(x_BTNH, position_ids, cfg):
    """Rotate q or k. position_ids: [B, T], or [B, 2, T] for rope_2d."""
    if cfg.position_encoding == "learned":
        return x_BTNH
    dt = x_BTNH.dtype
    r = cfg.rope_dim
    if cfg.position_encoding == "rope_2d":
        a = _rotate_half(x_BTNH[..., :r], _angles(position_ids[:, 0], cfg))
        b = _rotate_half(x_BTNH[..., r : 2 * r], _angles(position_ids[:, 1], cfg))
        out = jnp.concatenate([a, b, x_BTNH[..., 2 * r :].astype(jnp.float32)], axis=-1)
    elif cfg.position_encoding == "rope_half":
        rot = _rotate_half(x_BTNH[..., :r], _angles(position_ids, cfg))
        out = jnp.concatenate([rot, x_BTNH[..., r:].astype(jnp.float32)], axis=-1)
    else:
        rot = _rotate_interleaved(x_BTNH[..., :r], _angles(position_ids, cfg))
        out = jnp.concatenate([rot, x_BTNH[..., r:].astype(jnp.float32)], axis=-1)
    return out.astype(dt)
