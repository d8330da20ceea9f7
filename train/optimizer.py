"""The learning-rate schedule and the optimizer: AdamW direction, decoupled weight decay on dense kernels only,
frozen params (fnmatch patterns on '/'-joined param paths) held at zero update."""

from __future__ import annotations

import fnmatch

import jax
import optax
from flax import traverse_util


def make_schedule(tc, warmup: int):
    peak, steps = tc.learning_rate, tc.steps
    end = peak * tc.min_lr_ratio
    decay = max(steps - warmup, 1)
    if tc.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay, alpha=tc.min_lr_ratio)
    elif tc.schedule == "linear":
        after = optax.linear_schedule(peak, end, decay)
    else:
        after = optax.constant_schedule(peak)
    if warmup <= 0:
        return after
    return optax.join_schedules(
        [
            optax.linear_schedule(peak / warmup, peak, warmup - 1) if warmup > 1 else optax.constant_schedule(peak),
            after,
        ],
        [warmup],
    )


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


def not_trained(cfg, tc) -> list:
    """Patterns of params that no optimizer step changes whatever `freeze` says: buffers (the MoE router's
    score bias, glm_jax.model.moe.BUFFER_NAMES; moe.bias_update_rate moves it by a rule), the MTP layers when no MTP
    loss trains them (weight decay would otherwise shrink them; frozen they export bit for bit), and with an MTP
    loss their embedding and head copies (the loss trains the main ones, which the step copies into them)."""
    from glm_jax.model.moe import BUFFER_NAMES

    pats = [f"*/{n}" for n in BUFFER_NAMES] if cfg.num_experts else []
    if cfg.num_mtp_layers:
        pats += ["mtp_*/embed/*", "mtp_*/head/*"] if getattr(tc, "mtp_loss_weight", 0.0) else ["mtp_*"]
    return pats


def make_optimizer(tc, params, frozen):
    """AdamW direction + decoupled weight decay (the learning rate is applied by the step); frozen → zero."""
    tx = optax.chain(
        optax.scale_by_adam(tc.adam_b1, tc.adam_b2, tc.adam_eps),
        optax.add_decayed_weights(tc.weight_decay, mask=decay_mask(params)),
    )
    if any(jax.tree.leaves(frozen)):
        labels = jax.tree.map(lambda f: "freeze" if f else "train", frozen)
        tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
    return tx
