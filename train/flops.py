"""Model flops of a train step, counted from the config (not from XLA): what MFU figures divide by."""

from __future__ import annotations

import math

from flax import traverse_util

from glm_jax.model.transformer import param_shapes


def flops_per_token(cfg, seq_len: int) -> float:
    """Model (not XLA) training flops per token: 6·(matmul params) + 12·L·T·N·H for dense attention."""
    flat = traverse_util.flatten_dict(param_shapes(cfg), sep="/")
    n = sum(math.prod(v.shape) for k, v in flat.items() if not k.endswith("embedding"))
    if cfg.tie_word_embeddings:
        n += cfg.vocab_size * cfg.hidden_size
    attn = 12 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim
    return 6.0 * n + attn
