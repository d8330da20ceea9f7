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


def flash_flops(B, T, S, N, H, causal, prefix_len_mean=0.0):
    """Flops of the Pallas attention kernel (glm_jax/model/flash.py) by formula (XLA's cost_analysis cannot
    see inside Pallas calls), on visible (t, s) pairs only.

    fwd = 4·B·N·T·S·H·f (QKᵀ and PV, 2 flops per multiply-add), f = visible fraction of the [T, S] grid: 1 when not
    causal; with causal and prefix P (T == S): (P² + (T(T+1) - P(P+1))/2) / (T·S), evaluated at P = prefix_len_mean
    (exact for a constant prefix). bwd = 2.5·fwd = 10·B·N·T·S·H·f, the usual FlashAttention count (QKᵀ recompute,
    dV, dP, dQ, dK). bwd_executed = 14·B·N·T·S·H·f counts what these kernels run: the dq and dk/dv kernels each
    recompute QKᵀ and dO·Vᵀ (7 products). Skipped blocks run nothing; partly visible blocks run whole, uncounted."""
    if causal:
        P = min(max(float(prefix_len_mean), 0.0), float(T))
        frac = (P * P + (T * (T + 1) - P * (P + 1)) / 2) / (T * S)
    else:
        frac = 1.0
    unit = B * N * T * S * H * frac
    return {"fwd": 4 * unit, "bwd": 10 * unit, "bwd_executed": 14 * unit, "visible_fraction": frac}
