"""Model flops of a train step, counted from the config (not from XLA): what MFU figures divide by."""

from __future__ import annotations

import math

from flax import traverse_util

from glm_jax.model.transformer import param_shapes


def active_matmul_params(cfg, mtp: bool = False) -> float:
    """Parameters one token multiplies through: embeddings out; each routed expert tensor [E, ...] counts at
    num_experts_per_tok / E (the active-parameter count of a MoE); the MTP layers only when their loss trains."""
    flat = traverse_util.flatten_dict(param_shapes(cfg), sep="/")
    n = 0.0
    for k, v in flat.items():
        if k.endswith("embedding") or (k.startswith("mtp_") and not mtp) or k.endswith("score_bias"):
            continue
        share = cfg.num_experts_per_tok / cfg.num_experts if "/moe/experts/" in k else 1.0
        n += share * math.prod(v.shape)
    return n


def flops_per_token(cfg, seq_len: int, mtp: bool = False) -> float:
    """Model (not XLA) training flops per token: 6·(active matmul params) + 12·L·T·N·H for dense attention."""
    n = active_matmul_params(cfg, mtp)
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


# Part A (bidirectional) of a prefix objective is data-dependent; compile_only prices it at half the sequence.
PREFIX_SHARE = {"causal": 0.0, "blank_infilling": 0.5, "chatglm_prefix": 0.5, "sft": 0.5}


def attention_kernel_flops(cfg, batch_size: int, seq_len: int, objective: str) -> dict:
    """The Pallas kernel's flops in one train step (all layers, global batch), by formula (flash_flops), for
    compile_only's report: XLA's cost_analysis counts nothing inside a Pallas custom call.

    per layer: fwd = 4·B·N·T·S·H·f and bwd = 2.5·fwd (the FlashAttention-2 count); `executed` uses the kernels'
    own backward (14·B·N·T·S·H·f). With remat (full or dots) the layer's forward, kernel included, runs again in
    the backward pass, so fwd counts twice. f: the visible share of the [T, S] grid, causal with a prefix of
    PREFIX_SHARE[objective]·T (an assumption for prefix objectives: the boundary is data)."""
    P = PREFIX_SHARE.get(objective, 0.5) * seq_len
    per = flash_flops(batch_size, seq_len, seq_len, cfg.num_heads, cfg.head_dim, True, P)
    fwd_runs = 1 if cfg.remat == "none" else 2
    L = cfg.num_layers
    return {
        "total": L * (fwd_runs * per["fwd"] + per["bwd"]),
        "executed": L * (fwd_runs * per["fwd"] + per["bwd_executed"]),
        "per_layer_fwd": per["fwd"],
        "visible_fraction": per["visible_fraction"],
        "prefix_len_assumed": P,
        "formula": (
            f"{L} layers x ({fwd_runs} x fwd + bwd); fwd = 4*B*N*T*S*H*f, bwd = 2.5*fwd (FlashAttention-2 count); "
            f"B={batch_size} N={cfg.num_heads} T=S={seq_len} H={cfg.head_dim}, f={per['visible_fraction']:.4f} "
            f"(causal, prefix {P:g})"
        ),
    }
