"""GLM-5's DeepSeek sparse-attention (DSA) indexer: which keys each query attends to.

Legend: B batch, T queries, S keys, D model width, Q q_lora_rank, I index_head_dim, G index_n_heads.

    q_i[t, g]   = rope(q_lat[t] · W_qb)                  [B, T, G, I]   from MLA's normed query latent
    k_i[s]      = rope(LayerNorm(x[s] · W_k))            [B, S, I]      one key head, LayerNorm eps 1e-6
    w[t, g]     = (x[t] · W_w)[g] / sqrt(G)
    score[t, s] = sum_g w[t, g] · relu(q_i[t, g] · k_i[s] / sqrt(I))        in float32

Rotary (interleaved pairs) covers the first qk_rope_head_dim dims of q_i and k_i. Keys the mask hides score
-inf; each query keeps its top `index_topk` (all keys when there are fewer, the hidden ones then stay hidden by the
mask). The choice is discrete: no gradient reaches the indexer through it (transformers runs it under no_grad).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import linen as nn

from glm_jax.model.layers import Dense, Norm
from glm_jax.model.positions import apply_rope

if TYPE_CHECKING:
    from glm_jax.config import GLMConfig


def index_scores(q_BTGI, k_BSI, w_BTG, allowed_BTS):
    """score[b, t, s] (float32), -inf where the mask hides the key."""
    I, G = q_BTGI.shape[-1], q_BTGI.shape[-2]
    s = jnp.einsum(
        "btgi,bsi->btgs",
        q_BTGI.astype(jnp.float32),
        k_BSI.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    s = jax.nn.relu(s * jnp.float32(I**-0.5))
    w = w_BTG.astype(jnp.float32) * jnp.float32(G**-0.5)
    out = jnp.einsum("btg,btgs->bts", w, s, precision=jax.lax.Precision.HIGHEST)
    return jnp.where(allowed_BTS, out, -jnp.inf)


def select(topk_BTK, S: int):
    """[B, T, S] bool: True at the chosen keys."""
    B, T, _ = topk_BTK.shape
    b = jnp.arange(B)[:, None, None]
    t = jnp.arange(T)[None, :, None]
    return jnp.zeros((B, T, S), bool).at[b, t, topk_BTK].set(True)


class Indexer(nn.Module):
    cfg: GLMConfig

    @nn.compact
    def __call__(self, x_BTD, q_lat_BTQ, position_ids, allowed_BTS, cache=None, cache_index=None):
        """(scores [B, T, S] float32, the indexer keys [B, S, I] with this step's written at cache_index, or None
        without a cache)."""
        c = self.cfg
        D, G, I = c.hidden_size, c.index_n_heads, c.index_head_dim
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        q = Dense((c.q_lora_rank,), (G, I), ("kv", "kv", "kv"), False, name="wq_b", **kw)(q_lat_BTQ)
        q = apply_rope(q, position_ids, c)  # glm-moe-dsa: always interleaved
        k = Dense((D,), (I,), ("embed", "kv"), False, name="wk", **kw)(x_BTD)
        k = Norm("layernorm", 1e-6, c.dtype, c.param_dtype, name="k_norm")(k)
        k = apply_rope(k[:, :, None], position_ids, c)[:, :, 0]
        w = Dense((D,), (G,), ("embed", "kv"), False, name="weights_proj", **kw)(x_BTD)
        new_cache = None
        if cache is not None:
            k = new_cache = jax.lax.dynamic_update_slice_in_dim(cache, k.astype(cache.dtype), cache_index, axis=1)
        return index_scores(q, k, w, allowed_BTS), new_cache
