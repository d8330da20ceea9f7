"""Mixture of experts (Glm4Moe: GLM-4.5 / 4.6 / 4.7): a sigmoid router with a score-correction bias, routed SwiGLU
experts computed dropless with grouped matmuls, and shared SwiGLU experts.

Routing, per token (float32):
  scores  = sigmoid(x · router)                                   [N, E]
  choice  = scores + score_bias            (used only to choose; score_bias gets no gradient)
  groups  : the n_group groups scored by the sum of their top-2 choice values; the best topk_group are kept
  experts : the top num_experts_per_tok choice values within the kept groups
  weights = scores of the chosen experts (unbiased), / their sum if norm_topk_prob, × routed_scaling_factor

Expert computation: the N·k (token, expert) pairs are sorted by expert and each expert's contiguous run goes through
its SwiGLU with `jax.lax.ragged_dot` (one grouped matmul per projection over all experts). Nothing is dropped and
no [tokens, experts] activation is formed. The outputs are put back in token order and summed with the weights.

`score_bias` (the checkpoint's `e_score_correction_bias`) lives in the params tree so that loading, sharding and
export treat it like any tensor, but it is a buffer: the forward pass stops its gradient, and glm-train keeps it
out of the optimizer (`BUFFER_NAMES`); GLM-4.5's aux-loss-free balancing moves it by a rule, not by gradient.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import linen as nn

from glm_jax.model.layers import Dense, dtype_of, param

if TYPE_CHECKING:
    from glm_jax.config import GLMConfig

BUFFER_NAMES = ("score_bias",)  # params that are buffers: never trained by gradient


def route(x_ND, kernel_DE, bias_E, cfg):
    """(weights [N, k] float32, expert ids [N, k] int32, sigmoid scores [N, E]) for tokens x_ND."""
    E, k, G = cfg.num_experts, cfg.num_experts_per_tok, cfg.n_group
    logits = jnp.dot(x_ND.astype(jnp.float32), kernel_DE.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    scores = jax.nn.sigmoid(logits)
    choice = scores + jax.lax.stop_gradient(bias_E.astype(jnp.float32))
    choice = jax.lax.stop_gradient(choice)  # the choice is discrete; gradients flow through the weights only
    if G > 1:
        grouped = choice.reshape(-1, G, E // G)
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [N, G]
        _, keep_idx = jax.lax.top_k(group_scores, cfg.topk_group)
        keep = jax.nn.one_hot(keep_idx, G, dtype=jnp.bool_).any(axis=1)  # [N, G]
        choice = jnp.where(jnp.repeat(keep, E // G, axis=1), choice, -jnp.inf)
    _, idx = jax.lax.top_k(choice, k)
    w = jnp.take_along_axis(scores, idx, axis=1)
    if cfg.norm_topk_prob:
        w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20)
    return w * jnp.float32(cfg.routed_scaling_factor), idx.astype(jnp.int32), scores


def expert_load(idx_NK, num_experts: int):
    """Tokens routed to each expert [E] (int32), for logging and the bias update."""
    return jnp.bincount(idx_NK.reshape(-1), length=num_experts).astype(jnp.int32)


def grouped_swiglu(x_ND, idx_NK, w_NK, gate_EDI, up_EDI, down_EID, dt):
    """Σ_j w[n, j] · SwiGLU_{idx[n, j]}(x[n]) for every token, dropless: (token, expert) pairs sorted by expert,
    each projection one jax.lax.ragged_dot over the experts' contiguous groups."""
    N, k = idx_NK.shape
    E = gate_EDI.shape[0]
    flat = idx_NK.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # pair p = n·k + j, sorted by expert
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    xs = jnp.take(x_ND.astype(dt), order // k, axis=0)  # [N·k, D]
    pet = jnp.float32 if dt == jnp.float32 else None

    def mm(a, w):
        return jax.lax.ragged_dot(a, w.astype(dt), sizes, preferred_element_type=pet)

    h = jax.nn.silu(mm(xs, gate_EDI)) * mm(xs, up_EDI)
    y = mm(h.astype(dt), down_EID)  # [N·k, D]
    y = y.astype(jnp.float32) * jnp.take(w_NK.reshape(-1), order)[:, None]
    inv = jnp.argsort(order)  # back to (token, slot) order
    return jnp.take(y, inv, axis=0).reshape(N, k, -1).sum(axis=1)


class Router(nn.Module):
    cfg: GLMConfig

    @nn.compact
    def __call__(self, x_ND):
        c = self.cfg
        D, E = c.hidden_size, c.num_experts
        kernel = param(self, "kernel", (D, E), ("embed", "exp"), nn.initializers.normal(0.02), c.param_dtype)
        bias = param(self, "score_bias", (E,), ("exp",), nn.initializers.zeros, "float32")
        return route(x_ND, kernel, bias, c)


class Experts(nn.Module):
    cfg: GLMConfig

    @nn.compact
    def __call__(self, x_ND, idx_NK, w_NK):
        c = self.cfg
        E, D, inner = c.num_experts, c.hidden_size, c.moe_intermediate_size
        init = nn.initializers.normal(0.02)
        gate = param(self, "gate", (E, D, inner), ("exp", "embed", "moe_mlp"), init, c.param_dtype)
        up = param(self, "up", (E, D, inner), ("exp", "embed", "moe_mlp"), init, c.param_dtype)
        down = param(self, "down", (E, inner, D), ("exp", "moe_mlp", "embed"), init, c.param_dtype)
        return grouped_swiglu(x_ND, idx_NK, w_NK, gate, up, down, dtype_of(c.dtype))


class SwiGLU(nn.Module):
    """The shared experts: one SwiGLU of width n_shared_experts · moe_intermediate_size."""

    cfg: GLMConfig
    width: int

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        D, W = (c.hidden_size,), (self.width,)
        gate = Dense(D, W, ("embed", "mlp"), False, name="gate", **kw)(x)
        up = Dense(D, W, ("embed", "mlp"), False, name="up", **kw)(x)
        return Dense(W, D, ("mlp", "embed"), False, name="down", **kw)(jax.nn.silu(gate) * up)


class MoE(nn.Module):
    """Routed + shared experts on x [..., D]; the output has x's shape and the compute dtype."""

    cfg: GLMConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        dt = dtype_of(c.dtype)
        x_ND = x.reshape(-1, c.hidden_size)
        w, idx, _ = Router(c, name="router")(x_ND)
        if not self.is_initializing():
            self.sow("intermediates", "expert_load", expert_load(idx, c.num_experts))
        y = Experts(c, name="experts")(x_ND, idx, w)
        if c.n_shared_experts:
            y = y + SwiGLU(c, c.n_shared_experts * c.moe_intermediate_size, name="shared")(x_ND).astype(jnp.float32)
        return y.astype(dt).reshape(x.shape)
