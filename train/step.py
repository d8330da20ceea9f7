"""The jitted train step: loss, AdamW with masks, clipping, gradient accumulation, non-finite guard.

State is a plain dict {"step": int32 (updates applied), "params", "opt_state"}. The step is a pure function
of (state, batch); the trainer jits it with shardings from the logical rules (see parallel.py) and donates the
state. Legend: B batch rows, A microbatches, T length, V vocab.
"""
from __future__ import annotations

import fnmatch

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import traverse_util

from glm_jax.model.layers import dtype_of, matmul

EMBED_PATH = ("embed", "embedding")   # the word-embedding table (GLM-130B gradient shrink applies here)


# ---------------------------------------------------------------- schedule and optimizer
def make_schedule(tc: dict, warmup: int):
    peak, steps = tc["learning_rate"], tc["steps"]
    end = peak * tc["min_lr_ratio"]
    decay = max(steps - warmup, 1)
    if tc["schedule"] == "cosine":
        after = optax.cosine_decay_schedule(peak, decay, alpha=tc["min_lr_ratio"])
    elif tc["schedule"] == "linear":
        after = optax.linear_schedule(peak, end, decay)
    else:
        after = optax.constant_schedule(peak)
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(peak / warmup, peak, warmup - 1) if warmup > 1
                                 else optax.constant_schedule(peak), after], [warmup])


def _paths(tree):
    flat = traverse_util.flatten_dict(tree, sep="/")
    return flat


def decay_mask(params):
    """True where decoupled weight decay applies: dense kernels only (not norms, biases or embeddings)."""
    flat = _paths(params)
    return traverse_util.unflatten_dict({k: k.split("/")[-1] == "kernel" for k in flat}, sep="/")


def frozen_mask(params, patterns):
    """True for params whose '/'-joined path matches one of the fnmatch patterns (a bare prefix also matches)."""
    flat = _paths(params)
    hit = {k: any(fnmatch.fnmatchcase(k, p) or k.startswith(p.rstrip("/") + "/") for p in patterns) for k in flat}
    return traverse_util.unflatten_dict(hit, sep="/")


def make_optimizer(tc: dict, params, frozen):
    """AdamW direction + decoupled weight decay (the learning rate is applied by the step); frozen → zero."""
    tx = optax.chain(optax.scale_by_adam(tc["adam_b1"], tc["adam_b2"], tc["adam_eps"]),
                     optax.add_decayed_weights(tc["weight_decay"], mask=decay_mask(params)))
    if any(jax.tree.leaves(frozen)):
        labels = jax.tree.map(lambda f: "freeze" if f else "train", frozen)
        tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
    return tx


# ---------------------------------------------------------------- loss
def model_inputs(cfg, batch):
    """(input_ids, position_ids, prefix_len, segment_ids) in the shapes the model family wants."""
    pos = batch["position_ids"]
    two_d = cfg.position in ("learned_2d", "rope_2d")
    if two_d and pos.ndim == 2:
        pos = jnp.stack([pos, jnp.zeros_like(pos)], axis=1)
    elif not two_d and pos.ndim == 3:
        pos = pos[:, 0]   # 1-D families take the Part A index (GLM-130B style: no block channel)
    return batch["tokens"], pos, batch.get("prefix_len"), batch.get("segment_ids")


def _head_sums(cfg, h_BTD, w, targets_BT, mask_BT):
    """CE·mask, lse²·mask and correct-prediction sums of one block of tokens, from the final hidden states.

    The target logit is picked with a one-hot product rather than a gather: its gradient is then an
    elementwise product instead of a scatter into [B, T, V] (3x slower on CPU). The max of the logits is shared
    by the log-sum-exp and the accuracy ("the target's logit is the largest", ties count as correct: a max, not
    an argmax, which XLA:TPU compiles several times slower at large vocab x long sequence).
    """
    dt = dtype_of(cfg.dtype)
    logits_BTV = matmul(h_BTD.astype(dt), w.astype(dt), transpose_w=cfg.tie_word_embeddings).astype(jnp.float32)
    logits_BTV = nn.with_logical_constraint(logits_BTV, ("activation_batch", "activation_length", "activation_vocab"))
    max_BT = jnp.max(logits_BTV, axis=-1)
    m_BT = jax.lax.stop_gradient(max_BT)
    lse_BT = m_BT + jnp.log(jnp.sum(jnp.exp(logits_BTV - m_BT[..., None]), axis=-1))
    tgt_BT = jnp.sum(logits_BTV * jax.nn.one_hot(targets_BT, logits_BTV.shape[-1], dtype=jnp.float32), axis=-1)
    return jnp.stack([jnp.sum((lse_BT - tgt_BT) * mask_BT), jnp.sum(jnp.square(lse_BT) * mask_BT),
                      jnp.sum((tgt_BT >= max_BT) * mask_BT)])


def loss_sums(module, params, batch, z_loss: float = 0.0, chunk: int = 0):
    """Sums over the (micro)batch: CE·mask, z-loss term, correct predictions, loss tokens.

    The output projection and the loss are computed here from the model's final hidden states (the model's own
    logits are then dead code that XLA removes), so that with `chunk` > 0 the [B, T, V] logits are never held
    whole: blocks of `chunk` positions are projected and reduced one after another, and recomputed in the
    backward pass (jax.checkpoint) -- a long sequence with a 150k vocabulary needs GBs per row otherwise.
    """
    cfg = module.cfg
    ids, pos, prefix_len, seg = model_inputs(cfg, batch)
    _, hidden = module.apply({"params": params}, ids, None, pos, prefix_len, segment_ids=seg, return_hidden=True)
    h_BTD = hidden["final"]
    w = params["embed"]["embedding"] if cfg.tie_word_embeddings else params["lm_head"]["kernel"]
    mask_BT = batch["loss_mask"].astype(jnp.float32)
    targets_BT = batch["targets"].astype(jnp.int32)
    B, T = targets_BT.shape
    if chunk and T > chunk and T % chunk == 0:
        n = T // chunk
        split = lambda x: jnp.moveaxis(x.reshape((B, n, chunk) + x.shape[2:]), 1, 0)  # noqa: E731
        body = jax.checkpoint(lambda acc, xs: (acc + _head_sums(cfg, xs[0], w, xs[1], xs[2]), None))
        out, _ = jax.lax.scan(body, jnp.zeros(3, jnp.float32), (split(h_BTD), split(targets_BT), split(mask_BT)))
    else:
        out = _head_sums(cfg, h_BTD, w, targets_BT, mask_BT)
    sums = {"ce": out[0], "z": out[1], "correct": out[2], "count": jnp.sum(mask_BT)}
    return out[0] + z_loss * out[1], sums


def _microbatches(batch, A: int):
    """[B, ...] → [A, B/A, ...], microbatch a = rows a, A+a, 2A+a, ... (keeps each device's rows local)."""
    def split(x):
        x = x.reshape((x.shape[0] // A, A) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return jax.tree.map(split, batch)


# ---------------------------------------------------------------- the step
def make_train_step(module, tx, tc: dict, schedule, frozen, grad_shardings=None):
    A = tc["grad_accum"]
    clip, alpha, zc, chunk = tc["grad_clip"], tc["embedding_grad_shrink"], tc["z_loss"], tc["loss_chunk"]

    def grads_of(params, batch):
        # frozen params are constants: no gradient is computed for them at all
        p = jax.tree.map(lambda x, f: jax.lax.stop_gradient(x) if f else x, params, frozen)
        (_, sums), g = jax.value_and_grad(lambda q: loss_sums(module, q, batch, zc, chunk), has_aux=True)(p)
        g = jax.tree.map(lambda x: x.astype(jnp.float32), g)
        if grad_shardings is not None:
            g = jax.lax.with_sharding_constraint(g, grad_shardings)
        return g, sums

    def train_step(state, batch):
        params, opt_state = state["params"], state["opt_state"]
        if A == 1:
            grads, sums = grads_of(params, batch)
        else:
            def body(carry, mb):
                g, s = grads_of(params, mb)
                return jax.tree.map(jnp.add, carry, (g, s)), None
            zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(grads_of, params, jax.tree.map(lambda x: x[0], _microbatches(batch, A))))
            (grads, sums), _ = jax.lax.scan(body, zero, _microbatches(batch, A))
        count = jnp.maximum(sums["count"], 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
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
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = jax.tree.map(lambda p, u, f: p if f else (p - lr * u).astype(p.dtype), params, updates, frozen)
        loss = sums["ce"] / count
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(sums["z"])
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
        new_state = {"step": state["step"] + ok.astype(jnp.int32), "params": keep(new_params, params),
                     "opt_state": keep(new_opt, opt_state)}
        metrics = {"loss": loss, "accuracy": sums["correct"] / count, "grad_norm": grad_norm,
                   "learning_rate": lr, "z_loss": sums["z"] / count, "loss_tokens": sums["count"],
                   "skipped": 1 - ok.astype(jnp.int32)}
        return new_state, metrics

    return train_step


def make_eval_step(module, chunk: int = 0):
    def eval_step(params, batch):
        _, sums = loss_sums(module, params, batch, chunk=chunk)
        return {k: sums[k] for k in ("ce", "correct", "count")}
    return eval_step


def init_state(params, tx):
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


# ---------------------------------------------------------------- flops
def flops_per_token(cfg, seq_len: int) -> float:
    """Model (not XLA) training flops per token: 6·(matmul params) + 12·L·T·N·H for dense attention."""
    import math
    from glm_jax.model.transformer import param_shapes
    flat = traverse_util.flatten_dict(param_shapes(cfg), sep="/")
    n = sum(math.prod(v.shape) for k, v in flat.items() if not k.endswith("embedding"))
    if cfg.tie_word_embeddings:
        n += cfg.vocab_size * cfg.hidden_size
    attn = 12 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim
    return 6.0 * n + attn
