"""The loss head: the output projection and cross-entropy computed from the model's final hidden states, only
at the positions that carry loss (packed per batch shard) or in chunks, with its gradient written out.

Legend: B batch rows, T length, D width, V vocab, C packed slots, G batch shards.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from glm_jax.model.layers import dtype_of, matmul
from glm_jax.sharding import shards_along


def model_inputs(cfg, batch):
    """(input_ids, position_ids, prefix_len, segment_ids) in the shapes the model family wants."""
    pos = batch["position_ids"]
    two_d = cfg.positions_2d
    if two_d and pos.ndim == 2:
        pos = jnp.stack([pos, jnp.zeros_like(pos)], axis=1)
    elif not two_d and pos.ndim == 3:
        pos = pos[:, 0]  # 1-D families take the Part A index (GLM-130B style: no block channel)
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
    dw = (
        jax.lax.dot_general(d2, h2, one, preferred_element_type=acc)
        if tied
        else jax.lax.dot_general(h2, d2, one, preferred_element_type=acc)
    )
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

    def group(x):
        return x.reshape((G, n) + x.shape[2:])

    h, t, m = group(h_BTD), group(targets_BT), group(mask_BT)
    count_G = jnp.sum(m != 0, axis=1)

    def packed(C):
        def run(h, t, m):
            if n == C:
                return full()
            idx = jax.vmap(lambda row: jnp.nonzero(row != 0, size=C, fill_value=0)[0])(m)

            def take(x):
                return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

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
    return _packed(
        cfg,
        h_BTD,
        targets_BT,
        mask_BT,
        lambda h, t, m, idx: _head_sums(cfg, h, w, t, m),
        lambda: _head_sums(cfg, h_BTD, w, targets_BT, mask_BT),
    )


def _fused_head_fwd(cfg, z_loss, h_BTD, w, targets_BT, mask_BT):
    B, T, D = h_BTD.shape

    def some(h, t, m, idx):
        sums, dh, dw = _head_grads(cfg, z_loss, h, w, t, m)
        G = idx.shape[0]
        dh_full = jnp.zeros((G, B * T // G, D), dh.dtype).at[jnp.arange(G)[:, None], idx].add(dh)
        return sums, dh_full.reshape(B, T, D), dw

    sums, dh, dw = _packed(
        cfg, h_BTD, targets_BT, mask_BT, some, lambda: _head_grads(cfg, z_loss, h_BTD, w, targets_BT, mask_BT)
    )
    return sums, (dh, dw)


def _fused_head_bwd(cfg, z_loss, res, g):
    dh, dw = res
    return (g[0] * dh).astype(dh.dtype), (g[0] * dw).astype(dw.dtype), None, None


fused_head.defvjp(_fused_head_fwd, _fused_head_bwd)


def loss_sums(module, params, batch, z_loss: float = 0.0, chunk: int = 0, select: bool = True, rules=None, sc=None):
    """Sums over the (micro)batch: CE·mask, z-loss term, correct predictions, loss tokens.

    The output projection and the loss are computed here from the model's final hidden states (the model's own
    logits are then dead code that XLA removes), so that with `chunk` > 0 the [B, T, V] logits are never held
    whole: blocks of `chunk` positions are projected and reduced one after another, and recomputed in the
    backward pass (jax.checkpoint) -- a long sequence with a 150k vocabulary needs GBs per row otherwise.
    With `select` (and no chunking) the projection runs only at the positions that carry loss (see
    fused_head): blank infilling puts loss on Part B alone, so most logits would be thrown away.

    `rules` (train/moe_rules.py, a MoE model): the sums also hold the expert loads ("loads"), the balance term
    ("balance") and the MTP layers' CE sums and counts ("mtp_ce", "mtp_count" [M]); the objective gains the MTP
    and balance losses, weighted with the normalisers `sc` (moe_rules.scales of the whole step's batch).
    """
    if "choice_mask" in batch:  # objective=cloze
        return cloze_sums(module, params, batch)
    from train import dsa, moe_rules

    cfg = module.cfg
    ids, pos, prefix_len, seg = model_inputs(cfg, batch)
    mutable = ["intermediates"] if rules is not None else False
    res = module.apply(
        {"params": params}, ids, None, pos, prefix_len, segment_ids=seg, method="with_hidden", mutable=mutable
    )
    (_, hidden), inter = res if rules is not None else (res, {})
    h_BTD = hidden.final
    w = params["embed"]["embedding"] if cfg.tie_word_embeddings else params["lm_head"]["kernel"]
    mask_BT = batch["loss_mask"].astype(jnp.float32)
    out = _head(cfg, h_BTD, w, batch["targets"].astype(jnp.int32), mask_BT, z_loss, chunk, select)
    sums = {"ce": out[0], "z": out[1], "correct": out[2], "count": jnp.sum(mask_BT)}
    total = out[0] + z_loss * out[1]
    if rules is None:
        return total, sums
    trees = [inter.get("intermediates", {})]
    if rules.num_mtp:
        h_M, mtp_inter = module.apply(
            {"params": params},
            h_BTD,
            ids,
            None,
            pos,
            prefix_len,
            segment_ids=seg,
            shared=True,
            return_hidden=True,
            method="mtp",
            mutable=["intermediates"],
        )
        trees.append(mtp_inter.get("intermediates", {}))
        mtp = [_head(cfg, h_M[j], w, *moe_rules.mtp_targets(batch, j), 0.0, chunk, select) for j in range(len(h_M))]
        sums["mtp_ce"] = jnp.stack([o[0] for o in mtp])
        sums["mtp_count"] = jnp.stack([jnp.sum(moe_rules.mtp_targets(batch, j)[1]) for j in range(len(h_M))])
    sums["loads"], sums["balance"] = moe_rules.read_intermediates(*trees)
    total = total + moe_rules.objective_terms(rules, sc, sums.get("mtp_ce"), sums["balance"])
    if rules.indexer_weight:  # train/dsa.py; averaged over microbatches like the balance term
        sums["indexer_loss"] = dsa.read_loss(*trees)
        total = total + rules.indexer_weight * sums["indexer_loss"] * sc["aux"]
    return total, sums


def _head(cfg, h_BTD, w, targets_BT, mask_BT, z_loss, chunk, select):
    """[CE·mask, lse²·mask, correct·mask] sums of the output projection w on hidden states h (see loss_sums)."""
    B, T = targets_BT.shape
    if chunk and chunk < T and T % chunk == 0:
        n = T // chunk

        def split(x):
            return jnp.moveaxis(x.reshape((B, n, chunk) + x.shape[2:]), 1, 0)

        body = jax.checkpoint(lambda acc, xs: (acc + _head_sums(cfg, xs[0], w, xs[1], xs[2]), None))
        out, _ = jax.lax.scan(body, jnp.zeros(3, jnp.float32), (split(h_BTD), split(targets_BT), split(mask_BT)))
        return out
    if select:
        return fused_head(cfg, float(z_loss), h_BTD, w, targets_BT, mask_BT)
    return _head_sums(cfg, h_BTD, w, targets_BT, mask_BT)


def cloze_sums(module, params, batch):
    """objective=cloze (glm_jax/data/cloze.py batches of N records x C candidates): glm_jax.eval.cloze's
    cloze_loss summed instead of averaged -- ce = sum over records of -log softmax(candidate scores)[label] --,
    correct = records whose best-scoring candidate is the label, count = N records (the step divides by it).
    A candidate's score: the sum of its target log-probs, / (its target count) ** the row's length_penalty."""
    from glm_jax.eval.cloze import candidate_scores

    s_NC = candidate_scores(module, params, batch)
    lp_N = batch["length_penalty"].astype(jnp.float32)
    s_NC = s_NC / jnp.maximum(jnp.sum(batch["score_mask"], axis=-1), 1.0) ** lp_N[:, None]  # x ** 0 = 1
    labels_N = batch["labels"].astype(jnp.int32)
    logp_NC = jax.nn.log_softmax(s_NC, axis=-1)
    ce = -jnp.sum(jnp.take_along_axis(logp_NC, labels_N[:, None], axis=-1))
    correct = jnp.sum((jnp.argmax(s_NC, axis=-1) == labels_N).astype(jnp.float32))
    count = jnp.asarray(labels_N.shape[0], jnp.float32)
    return ce, {"ce": ce, "z": jnp.zeros((), jnp.float32), "correct": correct, "count": count}
