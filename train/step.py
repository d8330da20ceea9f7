"""The jitted train step: loss and gradients (train/loss.py), gradient accumulation, clipping, the optimizer
update (train/optimizer.py), and the non-finite guard.

State is a plain dict {"step": int32 (updates applied), "params", "opt_state"}. The step is a pure function
of (state, batch); the trainer jits it with shardings from the logical rules (see parallel.py) and donates the
state. Legend: B batch rows, A microbatches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from train import moe_rules
from train.loss import loss_sums

EMBED_PATH = ("embed", "embedding")  # the word-embedding table (GLM-130B gradient shrink applies here)


def _microbatches(batch, A: int):
    """[B, ...] → [A, B/A, ...], microbatch a = rows a, A+a, 2A+a, ... (keeps each device's rows local)."""

    def split(x):
        x = x.reshape((x.shape[0] // A, A) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def _float_grad(g, p):
    """A gradient leaf in float32; an integer param's (a quantized base, always frozen) is zero."""
    if g.dtype == jax.dtypes.float0:
        return jnp.zeros(p.shape, jnp.float32)
    return g.astype(jnp.float32)


# ---------------------------------------------------------------- the step
def make_grad_fn(module, tc, frozen, grad_shardings=None, params_fn=None, rules=None):
    """(params, batch) -> (gradients of the step's objective, divided by the loss-token count, and the sums):
    the loss over the whole batch, accumulated over tc.grad_accum microbatches. `params_fn(params)`: the model
    params the loss sees (an adapter run's base with the adapter applied, train/adapters.py); identity when
    None. `rules`: train/moe_rules.py's (MTP and balance losses, expert loads), or None."""
    A = tc.grad_accum
    to_model = params_fn or (lambda p: p)
    zc, chunk = tc.z_loss, tc.loss_chunk
    select = tc.loss_select

    def grads_of(params, batch, sc):
        # frozen params are constants inside the differentiated function: autodiff computes no gradient for them
        # (their entries come back as zeros, and the base's weight-gradient products are never built). A
        # stop_gradient applied before value_and_grad would not do that: the gradient w.r.t. its output is the
        # full one, which costs a whole backward pass for a LoRA run and enters grad_norm and clipping.
        def loss(q):
            q = jax.tree.map(lambda x, f: jax.lax.stop_gradient(x) if f else x, q, frozen)
            return loss_sums(module, to_model(q), batch, zc, chunk, select, rules, sc)

        # a quantized base's int8 kernels are never differentiated (allow_int: float0 "gradients", made zeros)
        (_, sums), g = jax.value_and_grad(loss, has_aux=True, allow_int=True)(params)
        g = jax.tree.map(_float_grad, g, params)
        if grad_shardings is not None:
            g = jax.lax.with_sharding_constraint(g, grad_shardings)
        return g, sums

    def grad_fn(params, batch):
        sc = moe_rules.scales(rules, batch, A) if rules is not None else None
        if A == 1:
            grads, sums = grads_of(params, batch, sc)
        else:

            def body(carry, mb):
                g, s = grads_of(params, mb, sc)
                return jax.tree.map(jnp.add, carry, (g, s)), None

            first = jax.tree.map(lambda x: x[0], _microbatches(batch, A))
            zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(grads_of, params, first, sc))
            (grads, sums), _ = jax.lax.scan(body, zero, _microbatches(batch, A))
        count = jnp.maximum(sums["count"], 1.0)
        return jax.tree.map(lambda g: g / count, grads), sums

    return grad_fn


def make_train_step(module, tx, tc, schedule, frozen, grad_shardings=None, params_fn=None):
    """`params_fn(params)`: the model params the loss sees (an adapter run's base with the adapter applied,
    train/adapters.py); identity when None."""
    rules = moe_rules.Rules.of(module.cfg, tc)
    grad_fn = make_grad_fn(module, tc, frozen, grad_shardings, params_fn, rules)
    clip, alpha = tc.grad_clip, tc.embedding_grad_shrink

    def train_step(state, batch):
        params, opt_state = state["params"], state["opt_state"]
        grads, sums = grad_fn(params, batch)
        count = jnp.maximum(sums["count"], 1.0)
        if alpha != 1.0 and EMBED_PATH[0] in grads:
            # GLM-130B: word_emb * alpha + stop_grad(word_emb) * (1 - alpha) — the forward value is unchanged,
            # the gradient reaching the table is scaled by alpha.
            grads = dict(grads)
            grads["embed"] = {**grads["embed"], "embedding": grads["embed"]["embedding"] * alpha}
        grad_norm = optax.tree.norm(grads)
        if clip > 0:
            scale = jnp.minimum(1.0, clip / (grad_norm + 1e-6))
            grads = jax.tree.map(lambda g: g * scale, grads)
        lr = schedule(state["step"])
        loss = sums["ce"] / count
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(sums["z"])

        def apply(params, opt_state):
            updates, new_opt = tx.update(grads, opt_state, params)
            new_params = jax.tree.map(lambda p, u, f: p if f else (p - lr * u).astype(p.dtype), params, updates, frozen)
            if rules is not None:  # the score biases' balancing rule, the MTP layers' head copies
                new_params = moe_rules.after_update(new_params, module.cfg, rules, sums)
            return new_params, new_opt

        # a non-finite step leaves params and optimizer state as they were (a branch, not a select between old
        # and new: the donated buffers are then updated in place instead of copied first)
        new_params, new_opt = jax.lax.cond(ok, apply, lambda p, o: (p, o), params, opt_state)
        new_state = {"step": state["step"] + ok.astype(jnp.int32), "params": new_params, "opt_state": new_opt}
        metrics = {
            "loss": loss,
            "accuracy": sums["correct"] / count,
            "grad_norm": grad_norm,
            "learning_rate": lr,
            "z_loss": sums["z"] / count,
            "loss_tokens": sums["count"],
            "skipped": 1 - ok.astype(jnp.int32),
        }
        if rules is not None:
            metrics.update(moe_rules.metrics(rules, sums, tc.grad_accum))
        return new_state, metrics

    return train_step


def make_eval_step(module, chunk: int = 0, select: bool = True, params_fn=None):
    def eval_step(params, batch):
        _, sums = loss_sums(module, params_fn(params) if params_fn else params, batch, chunk=chunk, select=select)
        return {k: sums[k] for k in ("ce", "correct", "count")}

    return eval_step


def init_state(params, tx, keep_ref: bool = False):
    """keep_ref: also a frozen copy of the params as "ref" (objective=dpo's reference model, train/rl/dpo.py)."""
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    return {**state, "ref": jax.tree.map(jnp.copy, params)} if keep_ref else state
