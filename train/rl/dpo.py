"""glm-train `objective=dpo` (DESIGN §3.12): the jitted DPO train step, equal to TRL 1.16's DPOTrainer.

Each step scores a batch of B preference pairs (train/rl/dpo_data.py) in one forward: the chosen rows and the
rejected rows are put on one batch axis [2B, T]. A completion's log-probability is the sum of its completion
tokens' log-probs (TRL's `per_token_logps.sum(dim=1)`); for `ipo` the loss sees its per-token mean, as TRL's
ipo branch does (dpo_trainer.py:1399-1402). The loss is train.rl.dpo_loss.

The reference log-probs come from the frozen starting checkpoint:
  - with a LoRA adapter (lora.rank > 0), from the run's own params with the adapter set to zero: the base with
    the adapter turned off, as TRL's `use_adapter(..., None)` (dpo_trainer.py:1326-1333); no second copy of the
    weights is held;
  - in a full finetune, from a frozen copy of the starting params kept in the train state as `state["ref"]`
    (TRL's ref_model). That copy is a second model in memory and in every checkpoint (it makes a resumed run
    exact); train the model with an adapter to hold one.

Metrics, TRL's (dpo_trainer.py:1579-1594), means over the step's pairs: rewards/chosen and rewards/rejected
(beta x (policy - reference) log-probs), rewards/accuracy (chosen reward > rejected reward), rewards/margin;
`accuracy` is the chosen completions' token accuracy (TRL's mean_token_accuracy).

Legend: B pairs, A microbatches, T length, D width, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from train.rl.dpo_data import BATCH_KEYS
from train.rl.losses import dpo_loss
from train.step import EMBED_PATH, _float_grad, _microbatches

REF = "ref"  # the train-state entry of a full finetune's frozen reference params


def keeps_ref(tc, adapter) -> bool:
    """Whether the train state holds a frozen copy of the starting params (objective dpo without LoRA)."""
    return tc.objective == "dpo" and adapter is None


def _row_logps(cfg, h_BTD, w, targets_BT, mask_BT, chunk: int):
    """(sum of the target log-probs · mask, sum of top-1 hits · mask), each [B], from the final hidden states.
    With `chunk` (loss_chunk) the [B, T, V] logits are built `chunk` positions at a time and recomputed in the
    backward pass, as train/loss.py does for the SFT loss."""
    from train.loss import _logits

    def block(h, t, m):
        logits = _logits(cfg, h, w)
        mx = jnp.max(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        lse = jax.lax.stop_gradient(mx) + jnp.log(jnp.sum(jnp.exp(logits - jax.lax.stop_gradient(mx)[..., None]), -1))
        return jnp.sum((tgt - lse) * m, -1), jnp.sum((tgt >= mx) * m, -1)

    B, T = targets_BT.shape
    if chunk and chunk < T and T % chunk == 0:

        def split(x):
            return jnp.moveaxis(x.reshape((B, T // chunk, chunk) + x.shape[2:]), 1, 0)

        def body(acc, xs):
            lp, hit = block(*xs)
            return (acc[0] + lp, acc[1] + hit), None

        zero = (jnp.zeros(B, jnp.float32), jnp.zeros(B, jnp.float32))
        out, _ = jax.lax.scan(jax.checkpoint(body), zero, (split(h_BTD), split(targets_BT), split(mask_BT)))
        return out
    return block(h_BTD, targets_BT, mask_BT)


def completion_logps(module, params, batch, chunk: int = 0):
    """(log-prob sums [2B], completion token counts [2B], top-1 hits [2B]) of the chosen rows then the rejected
    rows of a dpo batch, in one forward."""
    cfg = module.cfg
    ids = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], 0)
    targets = jnp.concatenate([batch["chosen_targets"], batch["rejected_targets"]], 0).astype(jnp.int32)
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], 0).astype(jnp.float32)
    _, hidden = module.apply({"params": params}, ids, method="with_hidden")
    w = params["embed"]["embedding"] if cfg.tie_word_embeddings else params["lm_head"]["kernel"]
    lp, hit = _row_logps(cfg, hidden.final, w, targets, mask, chunk)
    return lp, jnp.sum(mask, -1), hit


def reference_params(state, adapter, params_fn=None):
    """The reference model's params as the model sees them: with a LoRA adapter, the run's params with the adapter
    set to zero (B = 0 makes the delta B·A exactly zero: the base); otherwise the frozen copy state["ref"]."""
    from train.adapters import LORA

    if adapter is not None and adapter.kind == "lora":
        p = state["params"]
        return (params_fn or (lambda q: q))({**p, LORA: jax.tree.map(jnp.zeros_like, p[LORA])})
    return state[REF]


def make_grad_fn(module, tc, frozen, grad_shardings=None, params_fn=None):
    """(params, ref_params, batch) -> (gradients of the step's DPO loss, sums over its pairs): the loss is the mean
    over the batch's pairs, accumulated over tc.grad_accum equal microbatches. `ref_params`: the reference model's
    params as the model sees them; `params_fn(params)`: the policy's (an adapter run's base with the adapter
    applied, train/adapters.py), identity when None."""
    A, d = tc.grad_accum, tc.dpo
    beta, kind, ls, chunk = d.beta, d.loss, d.label_smoothing, tc.loss_chunk
    to_model = params_fn or (lambda p: p)

    def pair_terms(lp, n):
        """The loss's input per completion: the sum, or for ipo its per-token mean (TRL's clamp(min=1))."""
        return lp / jnp.maximum(n, 1.0) if kind == "ipo" else lp

    def grads_of(params, ref_params, mb):
        ref_lp, n, _ = completion_logps(module, ref_params, mb, chunk)
        ref_lp = jax.lax.stop_gradient(ref_lp)
        ref_c, ref_r = jnp.split(pair_terms(ref_lp, n), 2)

        def loss(q):
            # frozen params are constants of the differentiated function, as in train/step.py
            q = jax.tree.map(lambda x, f: jax.lax.stop_gradient(x) if f else x, q, frozen)
            lp, n, hit = completion_logps(module, to_model(q), mb, chunk)
            pc, pr = jnp.split(pair_terms(lp, n), 2)
            return dpo_loss(pc, pr, ref_c, ref_r, beta=beta, loss_type=kind, label_smoothing=ls), (lp, n, hit)

        (value, (lp, n, hit)), g = jax.value_and_grad(loss, has_aux=True, allow_int=True)(params)
        g = jax.tree.map(_float_grad, g, params)
        if grad_shardings is not None:
            g = jax.lax.with_sharding_constraint(g, grad_shardings)
        # TRL's rewards: beta x the summed log-ratios, whatever the loss type (dpo_trainer.py:1579-1580)
        rc, rr = jnp.split(beta * (lp - ref_lp), 2)
        sums = {
            "loss": value * rc.shape[0],
            "rewards/chosen": jnp.sum(rc),
            "rewards/rejected": jnp.sum(rr),
            "rewards/accuracy": jnp.sum((rc > rr).astype(jnp.float32)),
            "rewards/margin": jnp.sum(rc - rr),
            "hits": jnp.sum(jnp.split(hit, 2)[0]),
            "chosen_tokens": jnp.sum(jnp.split(n, 2)[0]),
            "tokens": jnp.sum(n),
        }
        return g, sums

    def grad_fn(params, ref_params, batch):
        if A == 1:
            return grads_of(params, ref_params, batch)

        # each microbatch's loss is its pairs' mean: the step's is the mean of the A equal-sized ones
        def body(carry, mb):
            return jax.tree.map(jnp.add, carry, grads_of(params, ref_params, mb)), None

        mbs = _microbatches(batch, A)
        first = jax.tree.map(lambda x: x[0], mbs)
        zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(grads_of, params, ref_params, first))
        (grads, sums), _ = jax.lax.scan(body, zero, mbs)
        return jax.tree.map(lambda g: g / A, grads), sums

    return grad_fn


def make_train_step(module, tx, tc, schedule, frozen, grad_shardings=None, params_fn=None, adapter=None):
    """(state, batch) -> (state, metrics), the DPO counterpart of train.step.make_train_step (the same clipping,
    non-finite guard and update)."""
    clip, alpha = tc.grad_clip, tc.embedding_grad_shrink
    grad_fn = make_grad_fn(module, tc, frozen, grad_shardings, params_fn)

    def train_step(state, batch):
        params, opt_state = state["params"], state["opt_state"]
        grads, sums = grad_fn(params, reference_params(state, adapter, params_fn), batch)
        pairs = batch["chosen_tokens"].shape[0]
        if alpha != 1.0 and EMBED_PATH[0] in grads:  # GLM-130B's embedding gradient shrink, as train/step.py
            grads = {**grads, "embed": {**grads["embed"], "embedding": grads["embed"]["embedding"] * alpha}}
        grad_norm = optax.tree.norm(grads)
        if clip > 0:
            scale = jnp.minimum(1.0, clip / (grad_norm + 1e-6))
            grads = jax.tree.map(lambda g: g * scale, grads)
        lr = schedule(state["step"])
        loss = sums["loss"] / pairs
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply(params, opt_state):
            updates, new_opt = tx.update(grads, opt_state, params)
            new = jax.tree.map(lambda p, u, f: p if f else (p - lr * u).astype(p.dtype), params, updates, frozen)
            return new, new_opt

        new_params, new_opt = jax.lax.cond(ok, apply, lambda p, o: (p, o), params, opt_state)
        new_state = {**state, "step": state["step"] + ok.astype(jnp.int32), "params": new_params, "opt_state": new_opt}
        metrics = {
            "loss": loss,
            "accuracy": sums["hits"] / jnp.maximum(sums["chosen_tokens"], 1.0),
            "grad_norm": grad_norm,
            "learning_rate": lr,
            "z_loss": jnp.zeros((), jnp.float32),
            "loss_tokens": sums["tokens"],
            "skipped": 1 - ok.astype(jnp.int32),
            **{k: sums[k] / pairs for k in sums if k.startswith("rewards/")},
        }
        return new_state, metrics

    return train_step


__all__ = ["BATCH_KEYS", "REF", "completion_logps", "keeps_ref", "make_grad_fn", "make_train_step", "reference_params"]
