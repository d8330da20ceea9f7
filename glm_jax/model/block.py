"""One transformer layer. The residual scheme is config data:

pre-norm (GLM, ChatGLM2+, Glm):  x = x + Attn(N1(x));            x = x + MLP(N2(x))
residual_from_norm + alpha (ChatGLM-6B): a = N1(x); x = alpha·a + Attn(a); m = N2(x); x = alpha·m + MLP(m)
sandwich (Glm4):                 x = x + N1'(Attn(N1(x)));        x = x + N2'(MLP(N2(x)))
With moe=True (Glm4Moe layers from first_k_dense_replace on) the MLP is the mixture of experts (moe.py).
attention_kind "mla" (GLM-4.7-Flash, GLM-5) puts multi-head latent attention (mla.py) in place of q/k/v heads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flax import linen as nn

from glm_jax.model.attention import Attention
from glm_jax.model.layers import Norm, constrain
from glm_jax.model.mla import MLA
from glm_jax.model.mlp import MLP
from glm_jax.model.moe import MoE

if TYPE_CHECKING:
    from glm_jax.config import GLMConfig

ACT = ("activation_batch", "activation_length", "activation_embed")


class Block(nn.Module):
    cfg: GLMConfig
    moe: bool = False
    indexer: bool = False  # MLA with DSA: this layer runs its own indexer

    @nn.compact
    def __call__(self, x_BTD, position_ids, mask, prefix_kv=None, cache=None, cache_index=None, topk=None):
        """(x, new cache or None, the DSA choice [B, T, k] for the next layers or None)."""
        c = self.cfg

        def norm(name):
            return Norm(c.norm, c.norm_eps, c.dtype, c.param_dtype, name=name)

        a = norm("input_norm")(x_BTD)
        if c.mla:
            h, new_cache, topk = MLA(c, self.indexer, name="attn")(a, position_ids, mask, cache, cache_index, topk)
        else:
            h, new_cache = Attention(c, name="attn")(a, position_ids, mask, prefix_kv, cache, cache_index)
        if c.sandwich_norm:
            h = norm("post_attn_norm")(h)
        x = (a if c.residual_from_norm else x_BTD) * c.residual_alpha + h
        x = constrain(x, ACT)
        m = norm("mlp_norm")(x)
        h = MoE(c, name="moe")(m) if self.moe else MLP(c, name="mlp")(m)
        if c.sandwich_norm:
            h = norm("post_mlp_norm")(h)
        x = (m if c.residual_from_norm else x) * c.residual_alpha + h
        return constrain(x, ACT), new_cache, topk
