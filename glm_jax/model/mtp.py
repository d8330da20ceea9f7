"""Multi-token prediction (GLM-4.5's MTP layers, stored after the last decoder layer).

MTP layer j (0-based) at position t combines the previous hidden state h_t (the main model's final-normed hidden
state for j = 0, layer j-1's output after its head norm otherwise) with the embedding of token t+j+1 and
predicts token t+j+2:

    x = eh_proj([enorm(embed(ids[t+j+1])) | hnorm(h_t)]);   x = Block(x) (a MoE decoder block);
    h'_t = head_norm(x);   logits_t = h'_t · head

as transformers' `MtpLayer`/`MtpModel` (modeling_layers.py) and the GLM-4.5 checkpoints lay it out (`eh_proj`,
`enorm`, `hnorm`, `shared_head.norm`, `shared_head.head`, `embed_tokens`). The layer uses its own stored
`embed_tokens` and `shared_head.head` (in the released checkpoints copies of the main model's). Positions past
the end of the sequence see token id 0; their predictions have no target.

Training (glm-train's `mtp_loss_weight`) follows DeepSeek-V3 and Megatron: the MTP layers share the main model's
embedding and output head (`shared=True` in GLMModel.mtp feeds them the main embedding; the trainer applies the
main head), as transformers' MtpModel ties them for drafting.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax.numpy as jnp
from flax import linen as nn

from glm_jax.model.block import Block
from glm_jax.model.layers import Dense, Norm, dtype_of, param

if TYPE_CHECKING:
    from glm_jax.config import GLMConfig


class _Table(nn.Module):
    num: int
    dim: int
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, ids):
        table = param(
            self, "embedding", (self.num, self.dim), ("vocab", "embed"), nn.initializers.normal(0.02), self.param_dtype
        )
        return jnp.take(table, ids, axis=0)


class MTPLayer(nn.Module):
    cfg: GLMConfig

    @nn.compact
    def __call__(self, h_BTD, ids_BT, position_ids, mask, e_BTD=None):
        """(logits [B, T, V] float32, h' [B, T, D]) for hidden states h and the ids it is fed (already shifted).
        e_BTD: those ids' embeddings from another table (the main model's), instead of this layer's own."""
        c = self.cfg
        dt = dtype_of(c.dtype)
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)

        def norm(name):
            return Norm(c.norm, c.norm_eps, c.dtype, c.param_dtype, name=name)

        if e_BTD is None:
            e_BTD = _Table(c.vocab_size, c.hidden_size, c.param_dtype, name="embed")(ids_BT)
        e = e_BTD.astype(dt)
        a = jnp.concatenate([norm("enorm")(e), norm("hnorm")(h_BTD)], axis=-1)
        D = c.hidden_size
        x = Dense((2 * D,), (D,), ("mlp", "embed"), False, name="eh_proj", **kw)(a)
        x, _, _ = Block(c, moe=True, indexer=c.index_topk > 0, name="block")(x, position_ids, mask)
        h = norm("head_norm")(x)
        logits = Dense((D,), (c.vocab_size,), ("embed", "vocab"), False, name="head", **kw)(h)
        return logits.astype(jnp.float32), h


def shift_ids(ids_BT, by: int):
    """ids moved `by` places left, the vacated end filled with 0."""
    if by == 0:
        return ids_BT
    return jnp.concatenate([ids_BT[:, by:], jnp.zeros_like(ids_BT[:, :by])], axis=1)


def mtp_logits(layers, final_BTD, input_ids, position_ids, mask, embed=None, return_hidden=False):
    """[M, B, T, V]: MTP layer j's logits at position t predict token t+j+2. `embed`: a function of ids giving
    the embeddings the layers take (None: each layer's own table). return_hidden: [M, B, T, D] head-normed
    hidden states instead of the logits (for a caller that applies the output head itself)."""
    h, out = final_BTD, []
    for j, layer in enumerate(layers):
        ids = shift_ids(input_ids, j + 1)
        logits, h = layer(h, ids, position_ids, mask, None if embed is None else embed(ids))
        out.append(h if return_hidden else logits)
    return jnp.stack(out)
