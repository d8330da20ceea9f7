"""The jitted train step: loss, AdamW with masks, clipping, gradient accumulation, non-finite guard.

State is a plain dict {"step": int32 (updates applied), "params", "opt_state"}. The step is a pure function
of (state, batch); the trainer jits it with shardings from the logical rules (see parallel.py) and donates the
state. Legend: B batch rows, A microbatches, T length, V vocab.
"""
from __future__ import annotations

import fnmatch
import functools

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
    logits_BTV = _logits(cfg, h_BTD, w)
    max_BT = jnp.max(logits_BTV, axis=-1)
    tgt_BT = jnp.sum(logits_BTV * jax.nn.one_hot(targets_BT, logits_BTV.shape[-1], dtype=jnp.float32), axis=-1)
    return _sums(logits_BTV, max_BT, tgt_BT, mask_BT)[0]


def _logits(cfg, h, w):
    """float32 logits [..., V] of hidden states h [..., D] (w: the tied embedding [V, D] or lm_head [D, V])."""
    dt = dtype_of(cfg.dtype)
    logits = matmul(h.astype(dt), w.astype(dt), transpose_w=cfg.tie_word_embeddings).astype(jnp.float32)
    return nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))


def _sums(logits, mx, tgt, mask):
    """([CE·mask, lse²·mask, correct·mask] sums, lse) from the logits, their max and the target logits."""
    m = jax.lax.stop_gradient(mx)
    lse = m + jnp.log(jnp.sum(jnp.exp(logits - m[..., None]), axis=-1))
    sums = jnp.stack([jnp.sum((lse - tgt) * mask), jnp.sum(jnp.square(lse) * mask), jnp.sum((tgt >= mx) * mask)])
    return sums, lse


def batch_shards(B: int) -> int:
    """How many pieces the mesh in context cuts the batch dim into (the activation_batch rule), 1 without one."""
    from glm_jax.sharding import shards_along
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else shards_along("activation_batch", B, mesh)


def _head_grads(cfg, z_loss, h, w, targets, mask):
    """(_head_sums's sums, d/dh, d/dw of sums[0] + z_loss·sums[1]) for one block, gradients written out:
    dlogits = mask·((1 + 2·z_loss·lse)·softmax - onehot). Computing them here, in the forward pass, means no
    [.., V] logits are kept for the backward pass and the one-hot is never materialized."""
    dt = dtype_of(cfg.dtype)
    tied = cfg.tie_word_embeddings
    hd, wd = h.astype(dt), w.astype(dt)
    logits = _logits(cfg, hd, wd)
    hit = jnp.arange(logits.shape[-1]) == targets[..., None]
    tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1, mode="clip")[..., 0]
    sums, lse = _sums(logits, jnp.max(logits, axis=-1), tgt, mask)
    scale = (mask * (1.0 + 2.0 * z_loss * lse))[..., None]
    dlogits = (scale * jnp.exp(logits - lse[..., None]) - jnp.where(hit, mask[..., None], 0.0)).astype(dt)
    dh = matmul(dlogits, wd, transpose_w=not tied)
    D, V = h.shape[-1], logits.shape[-1]
    h2, d2 = hd.reshape(-1, D), dlogits.reshape(-1, V)
    one = (((0,), (0,)), ((), ()))
    acc = jnp.float32 if dt == jnp.float32 else None
    dw = (jax.lax.dot_general(d2, h2, one, preferred_element_type=acc) if tied
          else jax.lax.dot_general(h2, d2, one, preferred_element_type=acc))
    return sums, dh.astype(h.dtype), dw.astype(w.dtype)


def pack_caps(n: int) -> list[int]:
    """The slot counts a batch shard of n positions can pack its loss positions into: sixteenths of n from n/8
    to n/2, then 3n/4 and n (only counts that are multiples of 8). Blank infilling puts loss on 15-50 % of the
    positions; sixteenths waste at most n/16 slots there (the default step at 30 % loss density, same-process
    A/B: 5 % faster than with eighths, which were 7 % faster than quarters). Every bucket is a branch of one
    lax.switch; compile time measured the same with 6 and 9 of them."""
    return sorted({n * k // 16 for k in (2, 3, 4, 5, 6, 7, 8, 12) if n * k % 128 == 0} | {n})


def _packed(cfg, h_BTD, targets_BT, mask_BT, fn, full):
    """fn over the positions with a non-zero loss_mask only, with static shapes; `full` over all of them.

    Each batch shard's B/G·T = n positions are packed (jnp.nonzero, in order) into the smallest of pack_caps(n)
    slots that holds every shard's loss positions (lax.switch: one branch runs); empty slots get weight 0.
    fn(h [G, C, D], targets, mask, idx [G, C] or None) is summed the same way as over all positions (another
    summation order). Packing stays inside a shard, so no activation crosses devices.
    """
    B, T, D = h_BTD.shape
    G = batch_shards(B)
    n = B * T // G
    caps = pack_caps(n)
    if len(caps) == 1:
        return full()
    group = lambda x: x.reshape((G, n) + x.shape[2:])  # noqa: E731
    h, t, m = group(h_BTD), group(targets_BT), group(mask_BT)
    count_G = jnp.sum(m != 0, axis=1)

    def packed(C):
        def run(h, t, m):
            if C == n:
                return full()
            idx = jax.vmap(lambda row: jnp.nonzero(row != 0, size=C, fill_value=0)[0])(m)
            take = lambda x: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)  # noqa: E731
            valid = jnp.arange(C)[None] < count_G[:, None]
            return fn(take(h), take(t), jnp.where(valid, take(m), 0.0), idx)
        return run
    branch = sum((jnp.max(count_G) > c).astype(jnp.int32) for c in caps[:-1])
    return jax.lax.switch(branch, [packed(c) for c in caps], h, t, m)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def fused_head(cfg, z_loss, h_BTD, w, targets_BT, mask_BT):
    """The output projection + loss sums [CE·mask, lse²·mask, correct·mask] at the loss positions only (packed,
    see _packed). Differentiable for the objective sums[0] + z_loss·sums[1] (its gradients are computed in
    the forward pass, _head_grads); the cotangent of sums[0] scales them, the other sums are reports."""
    return _packed(cfg, h_BTD, targets_BT, mask_BT, lambda h, t, m, idx: _head_sums(cfg, h, w, t, m),
                   lambda: _head_sums(cfg, h_BTD, w, targets_BT, mask_BT))


def _fused_head_fwd(cfg, z_loss, h_BTD, w, targets_BT, mask_BT):
    B, T, D = h_BTD.shape

    def some(h, t, m, idx):
        sums, dh, dw = _head_grads(cfg, z_loss, h, w, t, m)
        G = idx.shape[0]
        dh_full = jnp.zeros((G, B * T // G, D), dh.dtype).at[jnp.arange(G)[:, None], idx].add(dh)
        return sums, dh_full.reshape(B, T, D), dw
    sums, dh, dw = _packed(cfg, h_BTD, targets_BT, mask_BT, some,
                           lambda: _head_grads(cfg, z_loss, h_BTD, w, targets_BT, mask_BT))
    return sums, (dh, dw)


def _fused_head_bwd(cfg, z_loss, res, g):
    dh, dw = res
    return (g[0] * dh).astype(dh.dtype), (g[0] * dw).astype(dw.dtype), None, None


fused_head.defvjp(_fused_head_fwd, _fused_head_bwd)


def loss_sums(module, params, batch, z_loss: float = 0.0, chunk: int = 0, select: bool = True):
    """Sums over the (micro)batch: CE·mask, z-loss term, correct predictions, loss tokens.

    The output projection and the loss are computed here from the model's final hidden states (the model's own
    logits are then dead code that XLA removes), so that with `chunk` > 0 the [B, T, V] logits are never held
    whole: blocks of `chunk` positions are projected and reduced one after another, and recomputed in the
    backward pass (jax.checkpoint) -- a long sequence with a 150k vocabulary needs GBs per row otherwise.
    With `select` (and no chunking) the projection runs only at the positions that carry loss (see
    fused_head): blank infilling puts loss on Part B alone, so most logits would be thrown away.
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
    elif select:
        out = fused_head(cfg, float(z_loss), h_BTD, w, targets_BT, mask_BT)
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
    select = tc["loss_select"]

    def grads_of(params, batch):
        # frozen params are constants: no gradient is computed for them at all
        p = jax.tree.map(lambda x, f: jax.lax.stop_gradient(x) if f else x, params, frozen)
        (_, sums), g = jax.value_and_grad(lambda q: loss_sums(module, q, batch, zc, chunk, select), has_aux=True)(p)
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
        loss = sums["ce"] / count
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(sums["z"])

        def apply(params, opt_state):
            updates, new_opt = tx.update(grads, opt_state, params)
            new_params = jax.tree.map(lambda p, u, f: p if f else (p - lr * u).astype(p.dtype),
                                      params, updates, frozen)
            return new_params, new_opt
        # a non-finite step leaves params and optimizer state as they were (a branch, not a select between old
        # and new: the donated buffers are then updated in place instead of copied first)
        new_params, new_opt = jax.lax.cond(ok, apply, lambda p, o: (p, o), params, opt_state)
        new_state = {"step": state["step"] + ok.astype(jnp.int32), "params": new_params, "opt_state": new_opt}
        metrics = {"loss": loss, "accuracy": sums["correct"] / count, "grad_norm": grad_norm,
                   "learning_rate": lr, "z_loss": sums["z"] / count, "loss_tokens": sums["count"],
                   "skipped": 1 - ok.astype(jnp.int32)}
        return new_state, metrics

    return train_step


def make_eval_step(module, chunk: int = 0, select: bool = True):
    def eval_step(params, batch):
        _, sums = loss_sums(module, params, batch, chunk=chunk, select=select)
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
