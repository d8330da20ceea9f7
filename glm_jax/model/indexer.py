"""GLM-5's DeepSeek sparse-attention (DSA) indexer: which keys each query attends to.

Legend: B batch, T queries, S keys, D model width, Q q_lora_rank, I index_head_dim, G index_n_heads.

    q_i[t, g]   = rope(q_lat[t] · W_qb)                  [B, T, G, I]   from MLA's normed query latent
    k_i[s]      = rope(LayerNorm(x[s] · W_k))            [B, S, I]      one key head, LayerNorm eps 1e-6
    w[t, g]     = (x[t] · W_w)[g] / sqrt(G)
    score[t, s] = sum_g w[t, g] · relu(q_i[t, g] · k_i[s] / sqrt(I))        in float32

Rotary (interleaved pairs) covers the first qk_rope_head_dim dims of q_i and k_i. Keys the mask hides score
-inf; each query keeps its top `index_topk` (all keys when there are fewer, the hidden ones then stay hidden by the
mask). The choice is discrete: no gradient reaches the indexer through it (transformers runs it under no_grad).

Memory at long T (`choose`): the scores are computed per block of BLOCK queries, each block's [B, Tb, G, S] product
and [B, Tb, S] scores reduced to its top-k before the next block starts, so the indexer holds O(Tb · S) instead of
O(T · S) (at T = S = 32K, G = 32: 4 GiB a row in float32 per block of 1024 queries instead of 128 GiB). The flops
are the same as the dense form; the blocks run one after another (lax.map), and under autodiff each block is
recomputed in the backward pass (jax.checkpoint) rather than saved, one more forward of the indexer.

Training (DeepSeek-V3.2, arXiv 2512.02556 §2.1): the indexer learns from its own loss only. Its inputs are detached
(stop_gradient), and `indexer_kl` is the KL divergence from the indexer's distribution to the model's attention:
    p[t, s] = Σ_heads attn[t, s] / Σ_s' Σ_heads attn[t, s']       the target, detached, over the attended keys
    KL_t    = Σ_s p[t, s] · (log p[t, s] - log softmax(score[t, :])[s])
over the keys the query attends to: its top-k (the sparse stage) or every visible key (the dense warm-up,
cfg.index_dense), averaged over the queries that see at least one key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import linen as nn

from glm_jax.model.attention import NEG
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


BLOCK = 1024  # queries per block of `choose` and `dense_kl`


def _blocks(fn, block: int, *xs_BT):
    """fn over blocks of `block` queries of each x [B, T, ...], outputs joined to [B, T, ...]. Each block is a
    dynamic slice of its inputs (no transposed copy of a [B, T, S] input; T is padded to a multiple of `block`
    only when it is not one)."""
    T = xs_BT[0].shape[1]
    if block >= T:
        return fn(*xs_BT)
    n = -(-T // block)
    if n * block != T:
        xs_BT = tuple(jnp.pad(x, [(0, 0), (0, n * block - T)] + [(0, 0)] * (x.ndim - 2)) for x in xs_BT)

    def one(i):
        return fn(*(jax.lax.dynamic_slice_in_dim(x, i * block, block, axis=1) for x in xs_BT))

    out = jax.lax.map(jax.checkpoint(one), jnp.arange(n))

    def join(y):
        y = jnp.moveaxis(y, 0, 1)
        return y.reshape((y.shape[0], n * block) + y.shape[3:])[:, :T]

    return jax.tree.map(join, out)


def choose(q_BTGI, k_BSI, w_BTG, allowed_BTS, topk: int, block: int = BLOCK):
    """(scores [B, T, K] float32, key indices [B, T, K] int32) of each query's top K = min(topk, S) keys, as
    jax.lax.top_k over index_scores' rows, computed per block of queries (see the module docstring)."""
    K = min(topk, k_BSI.shape[1])

    def one(q, w, a):
        return jax.lax.top_k(index_scores(q, k_BSI, w, a), K)

    return _blocks(one, block, q_BTGI, w_BTG, allowed_BTS)


def _kl_rows(logits_BTK, target_BTK, valid_BTK):
    """(KL(p || softmax(logits)) [B, T], rows with a valid key [B, T] float32): p = target L1-normalised over the
    valid keys, the softmax over the valid keys only."""
    logits = jnp.where(valid_BTK, logits_BTK, NEG)
    logq = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.where(valid_BTK, jax.lax.stop_gradient(target_BTK).astype(jnp.float32), 0.0)
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    kl = jnp.sum(jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0)) - logq), 0.0), axis=-1)
    rows = jnp.any(valid_BTK, axis=-1)
    return jnp.where(rows, kl, 0.0), rows.astype(jnp.float32)


def _mean(kl_BT, rows_BT):
    return jnp.sum(kl_BT) / jnp.maximum(jnp.sum(rows_BT), 1.0)


def sparse_kl(scores_BTK, topk_BTK, probs_BTS):
    """The sparse stage's indexer loss (mean KL over queries): over each query's chosen keys, `scores` the
    indexer's at them (choose), `probs` the attention probabilities summed over heads."""
    target = jnp.take_along_axis(probs_BTS, topk_BTK, axis=-1)
    return _mean(*_kl_rows(scores_BTK, target, jnp.isfinite(scores_BTK)))


def dense_kl(q_BTGI, k_BSI, w_BTG, allowed_BTS, probs_BTS, block: int = BLOCK):
    """The dense warm-up's indexer loss (mean KL over queries): over every visible key, per block of queries."""

    def one(q, w, a, p):
        return _kl_rows(index_scores(q, k_BSI, w, a), p, a)

    return _mean(*_blocks(one, block, q_BTGI, w_BTG, allowed_BTS, probs_BTS))


class Indexer(nn.Module):
    cfg: GLMConfig

    def setup(self):
        c = self.cfg
        D, G, I = c.hidden_size, c.index_n_heads, c.index_head_dim
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        self.wq_b = Dense((c.q_lora_rank,), (G, I), ("kv", "kv", "kv"), False, **kw)
        self.wk = Dense((D,), (I,), ("embed", "kv"), False, **kw)
        self.k_norm = Norm("layernorm", 1e-6, c.dtype, c.param_dtype)
        self.weights_proj = Dense((D,), (G,), ("embed", "kv"), False, **kw)

    def project(self, x_BTD, q_lat_BTQ, position_ids, cache=None, cache_index=None):
        """(queries [B, T, G, I], keys [B, S, I] with this step's written at cache_index into `cache`, head
        weights [B, T, G], the new cache or None). The inputs are detached: only the indexer loss trains it."""
        c = self.cfg
        x_BTD, q_lat_BTQ = jax.lax.stop_gradient(x_BTD), jax.lax.stop_gradient(q_lat_BTQ)
        q = apply_rope(self.wq_b(q_lat_BTQ), position_ids, c)  # glm-moe-dsa: always interleaved
        k = self.k_norm(self.wk(x_BTD))
        k = apply_rope(k[:, :, None], position_ids, c)[:, :, 0]
        w = self.weights_proj(x_BTD)
        new_cache = None
        if cache is not None:
            k = new_cache = jax.lax.dynamic_update_slice_in_dim(cache, k.astype(cache.dtype), cache_index, axis=1)
        return q, k, w, new_cache

    def __call__(self, x_BTD, q_lat_BTQ, position_ids, allowed_BTS, cache=None, cache_index=None):
        """(scores [B, T, S] float32, the new cache or None): the dense form, for tests and inspection."""
        q, k, w, new_cache = self.project(x_BTD, q_lat_BTQ, position_ids, cache, cache_index)
        return index_scores(q, k, w, allowed_BTS), new_cache
