"""Multi-head latent attention (DeepSeek-V2's MLA; GLM-4.7-Flash, GLM-5), with GLM-5's sparse-attention choice.

Legend: B batch, T queries, S keys, D model width, N heads, Q q_lora_rank, R kv_lora_rank, C qk_nope_head_dim,
P qk_rope_head_dim, H = C + P (query/key head width), E v_head_dim.

    q      = x·W_q, or RMSNorm(x·W_qa)·W_qb                    [B, T, N, H] = [q_nope (C) | q_rot (P)]
    c_kv   = RMSNorm(x·W_kva)                                  [B, T, R]   one latent for every head
    k_rot  = x·W_kr                                            [B, T, P]   one rotary key for every head
    [k_nope | v] = c_kv·W_kvb                                  [B, T, N, C + E]
    scores = (q_nope·k_nope + rope(q_rot)·rope(k_rot)) / sqrt(H)

Rotary covers the P-slice only (cfg.position_encoding: interleaved pairs or rotate-half). The full forward expands the
latent into per-head keys and values (`expanded`). With a decode cache the cache holds only c_kv and rope(k_rot),
R + P numbers a token for all heads, and attention runs in the latent space (`absorbed`): the query absorbs
W_kvb's key half (q_nope·W_uk^T is a query over the latents) and the output its value half (the probabilities
weight the latents, then W_uv maps them to each head's values), as the DeepSeek-V2 paper derives. Both forms are
the same sum in a different order.

With cfg.index_topk (DSA) each query keeps only the keys its layer's indexer (glm_jax/model/indexer.py) or the
last full layer's chose; with cfg.index_dense (the indexer's warm-up) it keeps every visible key, the indexer still
runs for its loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import linen as nn

from glm_jax.model.attention import NEG, softmax
from glm_jax.model.context import context_shards
from glm_jax.model.indexer import Indexer, choose, dense_kl, select, sparse_kl
from glm_jax.model.layers import Dense, Norm, constrain, dtype_of, param
from glm_jax.model.masks import MaskSpec, dense_mask
from glm_jax.model.positions import apply_rope
from glm_jax.quant.formats import dequantize

if TYPE_CHECKING:
    from glm_jax.config import GLMConfig

HEADS = ("activation_batch", "activation_length", "activation_heads", None)


class LatentUp(nn.Module):
    """kv_b_proj's kernel [R, N, C + E], given whole: the expanded form multiplies the latents by it, the absorbed
    form splits it into the key half (folded into the query) and the value half (applied after attention).

    Weight-only quantized (`quantize=`, glm_jax/quant/): an int8 kernel (int4: R packed in pairs) beside its
    per-output `kernel_scale` [N, C + E], as a Dense holds it. Neither form is one matmul of x by the kernel, so
    the float kernel q · scale is formed here in the compute dtype, inside the jitted step (R x N x (C + E):
    4.6M values a layer on GLM-4.7-Flash, a transient the size of q_b_proj's kernel)."""

    cfg: GLMConfig

    @nn.compact
    def __call__(self):
        c = self.cfg
        shape = (c.kv_lora_rank, c.num_heads, c.qk_nope_head_dim + c.value_head_dim)
        if self.has_variable("params", "kernel_scale"):
            q, s = self.get_variable("params", "kernel"), self.get_variable("params", "kernel_scale")
            bits = 4 if q.shape[0] * 2 == c.kv_lora_rank else 8
            return dequantize(jnp.asarray(q), jnp.asarray(s), bits, dtype=dtype_of(c.dtype))
        return param(self, "kernel", shape, ("kv", "q_heads", "kv"), nn.initializers.normal(0.02), c.param_dtype)


def expanded(q_BTNH, c_BSR, krot_BSP, w_RNX, allowed_BTS, C: int, dt, head_sum: bool = False):
    """Attention over per-head keys and values expanded from the latents (the training form). [B, T, N, E]; with
    head_sum also the probabilities summed over heads [B, T, S] float32, detached (the DSA indexer's target)."""
    kv = jnp.einsum("bsr,rnx->bsnx", c_BSR.astype(dt), w_RNX.astype(dt), preferred_element_type=jnp.float32)
    k_nope, v = kv[..., :C].astype(dt), kv[..., C:].astype(dt)
    k = jnp.concatenate(
        [k_nope, jnp.broadcast_to(krot_BSP[:, :, None].astype(dt), k_nope.shape[:3] + (krot_BSP.shape[-1],))], -1
    )
    H = q_BTNH.shape[-1]
    scores = jnp.einsum("btnh,bsnh->bnts", q_BTNH.astype(dt), k, preferred_element_type=jnp.float32)
    scores = jnp.where(allowed_BTS[:, None], scores / jnp.sqrt(jnp.float32(H)), NEG)
    p32 = softmax(scores)
    ctx = jnp.einsum("bnts,bsne->btne", p32.astype(dt), v, preferred_element_type=jnp.float32).astype(dt)
    return (ctx, jax.lax.stop_gradient(jnp.sum(p32, axis=1))) if head_sum else ctx


def absorbed(q_BTNH, c_BSR, krot_BSP, w_RNX, allowed_BTS, C: int, dt):
    """The same attention computed against the latents themselves (the decode form). [B, T, N, E]."""
    H = q_BTNH.shape[-1]
    w_uk, w_uv = w_RNX[..., :C].astype(dt), w_RNX[..., C:].astype(dt)
    q_lat = jnp.einsum("btnc,rnc->btnr", q_BTNH[..., :C].astype(dt), w_uk, preferred_element_type=jnp.float32)
    scores = jnp.einsum("btnr,bsr->bnts", q_lat.astype(dt), c_BSR.astype(dt), preferred_element_type=jnp.float32)
    scores = scores + jnp.einsum(
        "btnp,bsp->bnts", q_BTNH[..., C:].astype(dt), krot_BSP.astype(dt), preferred_element_type=jnp.float32
    )
    scores = jnp.where(allowed_BTS[:, None], scores / jnp.sqrt(jnp.float32(H)), NEG)
    probs = softmax(scores).astype(dt)
    ctx_lat = jnp.einsum("bnts,bsr->btnr", probs, c_BSR.astype(dt), preferred_element_type=jnp.float32)
    ctx = jnp.einsum("btnr,rne->btne", ctx_lat.astype(dt), w_uv, preferred_element_type=jnp.float32)
    return ctx.astype(dt)


class MLA(nn.Module):
    cfg: GLMConfig
    indexer: bool = False  # this layer runs its own DSA indexer (else it takes `topk` from an earlier layer)

    @nn.compact
    def __call__(self, x_BTD, position_ids, mask, cache=None, cache_index=None, topk=None):
        """mask: allowed_BTS [B, T, S], or a MaskSpec (made dense here: no blockwise kernel for MLA yet).
        cache: (latents [B, S, R], rotary keys [B, S, P][, indexer keys [B, S, I]]) written at cache_index.
        topk: the last full layer's choice [B, T, k] (DSA shared layers). Returns (out, new cache, choice)."""
        c = self.cfg
        D, N, H, C, P, E = c.hidden_size, c.num_heads, c.head_dim, c.qk_nope_head_dim, c.rope_dim, c.value_head_dim
        dt = dtype_of(c.dtype)
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        if isinstance(mask, MaskSpec):
            if context_shards(x_BTD.shape[1]) > 1:  # the tokens arrive in balanced order: dense_mask would be wrong
                raise NotImplementedError("context parallelism (mesh.context > 1) is not implemented for MLA")
            mask = dense_mask(mask, x_BTD.shape[1])

        def latent_norm(name):
            return Norm("rmsnorm", c.latent_norm_eps, c.dtype, c.param_dtype, name=name)

        q_lat = None
        if c.q_lora_rank:
            q_lat = latent_norm("q_a_norm")(
                Dense((D,), (c.q_lora_rank,), ("embed", "kv"), c.qkv_bias, name="q_a", **kw)(x_BTD)
            )
            q = Dense((c.q_lora_rank,), (N, H), ("kv", "q_heads", "kv"), False, name="q_b", **kw)(q_lat)
        else:
            q = Dense((D,), (N, H), ("embed", "q_heads", "kv"), False, name="q", **kw)(x_BTD)
        q = jnp.concatenate([q[..., :C], apply_rope(q[..., C:], position_ids, c)], axis=-1)
        q = constrain(q, HEADS)
        c_kv = latent_norm("kv_a_norm")(
            Dense((D,), (c.kv_lora_rank,), ("embed", "kv"), c.qkv_bias, name="kv_a", **kw)(x_BTD)
        )
        k_rot = Dense((D,), (P,), ("embed", "kv"), c.qkv_bias, name="k_rope", **kw)(x_BTD)
        k_rot = apply_rope(k_rot[:, :, None], position_ids, c)[:, :, 0]
        w = LatentUp(c, name="kv_b")()

        new_cache, index_keys = None, None
        if cache is not None:  # write this step's latents at cache_index, attend over the whole cache
            c_kv = jax.lax.dynamic_update_slice_in_dim(cache[0], c_kv.astype(cache[0].dtype), cache_index, axis=1)
            k_rot = jax.lax.dynamic_update_slice_in_dim(cache[1], k_rot.astype(cache[1].dtype), cache_index, axis=1)
            new_cache = (c_kv, k_rot, *cache[2:])
            index_keys = cache[2] if len(cache) > 2 else None
        allowed = mask
        # the indexer's KL (glm_jax/model/indexer.py) is sown in training applies that collect intermediates
        kl = self.indexer and cache is None and self.is_mutable_collection("intermediates")
        kl = kl and not self.is_initializing()
        if c.index_topk:
            if self.indexer:
                ind = Indexer(c, name="indexer")
                q_i, k_i, w_i, new_keys = ind.project(x_BTD, q_lat, position_ids, index_keys, cache_index)
                if cache is not None:
                    new_cache = (c_kv, k_rot, new_keys)
                if not c.index_dense:
                    top_scores, topk = choose(q_i, k_i, w_i, mask, c.index_topk)
            if not c.index_dense:
                allowed = allowed & select(topk, allowed.shape[-1])
        if kl:
            ctx, probs = expanded(q, c_kv, k_rot, w, allowed, C, dt, head_sum=True)
            loss = dense_kl(q_i, k_i, w_i, mask, probs) if c.index_dense else sparse_kl(top_scores, topk, probs)
            self.sow("intermediates", "indexer_loss", loss)
        else:
            ctx = (expanded if cache is None else absorbed)(q, c_kv, k_rot, w, allowed, C, dt)
        ctx = constrain(ctx, HEADS)
        out = Dense((N, E), (D,), ("q_heads", "kv", "embed"), c.out_bias, name="o", **kw)(ctx)
        return out, new_cache, topk
