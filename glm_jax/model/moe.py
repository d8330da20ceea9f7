"""Mixture of experts (Glm4Moe: GLM-4.5 / 4.6 / 4.7): a sigmoid router with a score-correction bias, routed SwiGLU
experts computed dropless with grouped matmuls, and shared SwiGLU experts.

Routing, per token (float32):
  scores  = sigmoid(x · router)                                   [M, E]
  choice  = scores + score_bias            (used only to choose; score_bias gets no gradient)
  groups  : the n_group groups scored by the sum of their top-2 choice values; the best topk_group are kept
  experts : the top num_experts_per_tok choice values within the kept groups
  weights = scores of the chosen experts (unbiased), / their sum if norm_topk_prob, × routed_scaling_factor

Expert computation: the M·X (token, expert) pairs are sorted by expert and each expert's contiguous run goes through
its SwiGLU with one grouped matmul per projection over all experts (`jax.lax.ragged_dot`; on CPU its tiled form
in glm_jax/model/grouped_matmul.py). Nothing is dropped and no [tokens, experts] activation is formed. The outputs
are put back in token order and summed with the weights.

`score_bias` (the checkpoint's `e_score_correction_bias`) lives in the params tree so that loading, sharding and
export treat it like any tensor, but it is a buffer: the forward pass stops its gradient, and glm-train keeps it
out of the optimizer (`BUFFER_NAMES`); GLM-4.5's aux-loss-free balancing moves it by a rule, not by gradient.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax
from jax.sharding import PartitionSpec as P

from glm_jax.model.context import mesh_axes
from glm_jax.model.grouped_matmul import grouped_matmul
from glm_jax.model.layers import Dense, dtype_of, param

if TYPE_CHECKING:
    from glm_jax.config import GLMConfig

BUFFER_NAMES = ("score_bias",)  # params that are buffers: never trained by gradient


def route(x_MD, kernel_DE, bias_E, cfg):
    """(weights [M, X] float32, expert ids [M, X] int32, sigmoid scores [M, E]) for tokens x_MD."""
    E, k, Q = cfg.num_experts, cfg.num_experts_per_tok, cfg.n_group
    logits = jnp.dot(x_MD.astype(jnp.float32), kernel_DE.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    scores = jax.nn.sigmoid(logits)
    choice = scores + jax.lax.stop_gradient(bias_E.astype(jnp.float32))
    choice = jax.lax.stop_gradient(choice)  # the choice is discrete; gradients flow through the weights only
    if Q > 1:
        grouped = choice.reshape(-1, Q, E // Q)
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [M, Q]
        _, keep_idx = jax.lax.top_k(group_scores, cfg.topk_group)
        keep = jax.nn.one_hot(keep_idx, Q, dtype=jnp.bool_).any(axis=1)  # [M, Q]
        choice = jnp.where(jnp.repeat(keep, E // Q, axis=1), choice, -jnp.inf)
    _, idx = jax.lax.top_k(choice, k)
    w = jnp.take_along_axis(scores, idx, axis=1)
    if cfg.norm_topk_prob:
        w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20)
    return w * jnp.float32(cfg.routed_scaling_factor), idx.astype(jnp.int32), scores


def expert_load(idx_MX, num_experts: int):
    """Tokens routed to each expert [E] (int32), for logging and the bias update."""
    return jnp.bincount(idx_MX.reshape(-1), length=num_experts).astype(jnp.int32)


def sequence_balance(scores_ME, idx_MX, rows: int):
    """DeepSeek-V3's complementary sequence-wise balance term, averaged over the `rows` sequences the M tokens
    form (each T = M / rows tokens, in any order): per sequence sum_e f_e P_e with f_e = E / (k T) · (tokens
    whose top-k holds e) and P_e = the mean over its tokens of s_e / sum(s), s the unbiased sigmoid scores.
    f is a count (no gradient); the gradient flows through P."""
    M, E = scores_ME.shape
    k, T = idx_MX.shape[1], M // rows
    row_M = jnp.arange(M, dtype=jnp.int32) // T
    count_RE = jnp.zeros((rows, E), jnp.float32).at[row_M[:, None], idx_MX].add(1.0)
    f_RE = jax.lax.stop_gradient(count_RE) * (E / (k * T))
    p_RE = (scores_ME / jnp.sum(scores_ME, axis=-1, keepdims=True)).reshape(rows, T, E).mean(axis=1)
    return jnp.mean(jnp.sum(f_RE * p_RE, axis=-1))


def grouped_swiglu(x_MD, idx_MX, w_MX, gate_EDF, up_EDF, down_EFD, dt):
    """Σ_j w[n, j] · SwiGLU_{idx[n, j]}(x[n]) for every token, dropless: (token, expert) pairs sorted by expert,
    each projection one grouped matmul (ragged_dot) over the experts' contiguous groups. A pair whose expert id
    is E or more (another device's expert, under expert parallelism) sorts last, outside every group, and
    contributes 0."""
    M, k = idx_MX.shape
    E = gate_EDF.shape[0]
    flat = idx_MX.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # pair p = n·k + j, sorted by expert
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)  # ids >= E are not counted
    xs = jnp.take(x_MD.astype(dt), order // k, axis=0)  # [M·X, D]
    pet = jnp.float32 if dt == jnp.float32 else None

    def mm(a, w):
        return grouped_matmul(a, w.astype(dt), sizes, preferred_element_type=pet)

    h = jax.nn.silu(mm(xs, gate_EDF)) * mm(xs, up_EDF)
    y = mm(h.astype(dt), down_EFD)  # [M·X, D]
    mine = jnp.take(flat, order) < E
    y = jnp.where(mine[:, None], y.astype(jnp.float32) * jnp.take(w_MX.reshape(-1), order)[:, None], 0.0)
    inv = jnp.argsort(order)  # back to (token, slot) order
    return jnp.take(y, inv, axis=0).reshape(M, k, -1).sum(axis=1)


class Router(nn.Module):
    cfg: GLMConfig

    @nn.compact
    def __call__(self, x_MD):
        c = self.cfg
        D, E = c.hidden_size, c.num_experts
        kernel = param(self, "kernel", (D, E), ("embed", "exp"), nn.initializers.normal(0.02), c.param_dtype)
        bias = param(self, "score_bias", (E,), ("exp",), nn.initializers.zeros, "float32")
        return route(x_MD, kernel, bias, c)


class Experts(nn.Module):
    cfg: GLMConfig

    @nn.compact
    def __call__(self, x_MD, idx_MX, w_MX):
        c = self.cfg
        E, D, inner = c.num_experts, c.hidden_size, c.moe_intermediate_size
        init = nn.initializers.normal(0.02)
        gate = param(self, "gate", (E, D, inner), ("exp", "embed", "moe_mlp"), init, c.param_dtype)
        up = param(self, "up", (E, D, inner), ("exp", "embed", "moe_mlp"), init, c.param_dtype)
        down = param(self, "down", (E, inner, D), ("exp", "moe_mlp", "embed"), init, c.param_dtype)
        dt = dtype_of(c.dtype)
        mesh = jax.sharding.get_abstract_mesh()
        axis = None if mesh.empty else mesh_axes("exp", E, mesh)
        if axis is None:
            return grouped_swiglu(x_MD, idx_MX, w_MX, gate, up, down, dt)
        return expert_parallel(x_MD, idx_MX, w_MX, gate, up, down, dt, mesh, axis)


def expert_parallel(x_MD, idx_MX, w_MX, gate, up, down, dt, mesh, axis):
    """The routed experts with their weights split over the mesh axis `axis` (X devices, E/X experts each), under
    shard_map. Each device gathers the tokens (and their routing) of the devices along `axis` (jax's all_gather),
    runs its own experts on the pairs routed to them (dropless, grouped matmuls as grouped_swiglu) and the partial
    outputs are summed and handed back to the devices the tokens came from (psum_scatter). Tokens are split over
    `axis` as a batch axis outside the MoE layers (the 'expert' rule of activation_batch), so no device computes
    another's tokens twice. Where the tokens are not split over it (too few rows), each device keeps all tokens
    and the partial outputs are summed (psum). This is MaxText's all-gather flavour of expert parallelism; the
    all-to-all flavour moves fewer bytes for large expert counts and is not implemented here."""
    M, k = idx_MX.shape
    E = gate.shape[0]
    tup = (axis,) if isinstance(axis, str) else tuple(axis)
    X = math.prod(mesh.shape[a] for a in tup)
    rows = mesh_axes("activation_batch", M, mesh)
    rows_tup = () if rows is None else ((rows,) if isinstance(rows, str) else tuple(rows))
    split = rows_tup[-len(tup) :] == tup  # the expert axes are the minor batch axes: gather/scatter over them
    if not split:
        rows = tuple(a for a in rows_tup if a not in tup) or None
        rows = rows[0] if rows is not None and len(rows) == 1 else rows

    def local(x, idx, w, g, u, d):
        if split:
            x, idx, w = (lax.all_gather(a, tup, axis=0, tiled=True) for a in (x, idx, w))
        first = lax.axis_index(tup) * (E // X)
        ids = idx - first
        ids = jnp.where((ids >= 0) & (ids < E // X), ids, E // X)  # other devices' experts: outside every group
        y = grouped_swiglu(x, ids, w, g, u, d, dt)
        return lax.psum_scatter(y, tup, scatter_dimension=0, tiled=True) if split else lax.psum(y, tup)

    experts = P(axis, None, None)
    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(rows, None), P(rows, None), P(rows, None), experts, experts, experts),
        out_specs=P(rows, None),
        check_vma=False,
    )
    return fn(x_MD, idx_MX, w_MX, gate, up, down)


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
        x_MD = x.reshape(-1, c.hidden_size)
        w, idx, scores = Router(c, name="router")(x_MD)
        if self.is_mutable_collection("intermediates") and not self.is_initializing():
            # what glm-train's MoE rules read (train/moe_rules.py): the load, and the balance loss term
            self.sow("intermediates", "expert_load", expert_load(idx, c.num_experts))
            rows = x.shape[0] if x.ndim == 3 else 1
            self.sow("intermediates", "sequence_balance", sequence_balance(scores, idx, rows))
        y = Experts(c, name="experts")(x_MD, idx, w)
        if c.n_shared_experts:
            y = y + SwiGLU(c, c.n_shared_experts * c.moe_intermediate_size, name="shared")(x_MD).astype(jnp.float32)
        return y.astype(dt).reshape(x.shape)
