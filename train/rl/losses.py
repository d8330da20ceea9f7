"""The DPO and GRPO losses of DESIGN.md §3.12, written in JAX as TRL writes them in torch.

They are transcribed rather than called because the train step is one jitted JAX function; tests/test_rl_losses.py
calls TRL's own code on the same numbers. Line numbers cite the installed trl 1.16.0 (trl/trainer/grpo_trainer.py,
trl/trainer/dpo_trainer.py) and, for the label-smoothed sigmoid loss that TRL 1.x dropped, trl 0.28.0's
trl/trainer/dpo_trainer.py.

Legend: B completions (GRPO) or pairs (DPO), T completion length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def grpo_loss(
    logp_BT,
    old_logp_BT,
    ref_logp_BT,
    advantages_B,
    mask_BT,
    *,
    beta: float,
    epsilon: float,
    epsilon_high: float | None,
    loss_type: str,
    max_completion_length: int,
    num_items_in_batch=None,
):
    """TRL 1.16 GRPOTrainer._compute_loss (token-level importance sampling, no entropy mask or bonus, no vLLM
    correction: TRL's defaults) for per-token log-probabilities of the sampled completion tokens.

    old_logp_BT: the log-probs at sampling time; None means this very policy (TRL's `per_token_logps.detach()`
    when num_iterations == 1, grpo_trainer.py:3066). ref_logp_BT may be None when beta == 0, where TRL never reads
    it. epsilon_high None means epsilon (grpo_trainer.py:946). num_items_in_batch (dapo only): the completion-token
    count of the whole step across microbatches and processes, TRL's `num_items_in_batch` with one process and
    one accumulation step per generation; None means this batch's own count. A microbatch's loss for grpo, bnpo
    and dr_grpo is, as in TRL, its own mean: the caller averages over gradient-accumulation steps.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"grpo loss_type {loss_type!r}: expected one of {', '.join(GRPO_LOSS_TYPES)}")
    if epsilon_high is None:
        epsilon_high = epsilon
    mask_BT = mask_BT.astype(jnp.float32)
    if old_logp_BT is None:
        old_logp_BT = jax.lax.stop_gradient(logp_BT)
    adv = advantages_B[:, None] if advantages_B.ndim == 1 else advantages_B  # grpo_trainer.py:3058-3059

    coef_1 = jnp.exp(logp_BT - old_logp_BT)  # grpo_trainer.py:3083-3095
    coef_2 = jnp.clip(coef_1, 1 - epsilon, 1 + epsilon_high)  # 3113
    per_token_loss = -jnp.minimum(coef_1 * adv, coef_2 * adv)  # 3118-3120
    if beta != 0.0:
        # k3 estimator of KL(policy || ref), grpo_trainer.py:3098-3102, added at 3149-3150
        d = ref_logp_BT - logp_BT
        per_token_loss = per_token_loss + beta * (jnp.exp(d) - d - 1)

    masked = per_token_loss * mask_BT
    if loss_type == "grpo":  # 3153-3154: each completion's token mean, then the mean over completions
        return jnp.mean(jnp.sum(masked, -1) / jnp.maximum(jnp.sum(mask_BT, -1), 1.0))
    if loss_type == "bnpo":  # 3158-3159: the token mean over the batch
        return jnp.sum(masked) / jnp.maximum(jnp.sum(mask_BT), 1.0)
    if loss_type == "dr_grpo":  # 3163-3164: a constant denominator, B x max_completion_length
        return jnp.sum(masked) / (masked.shape[0] * max_completion_length)
    # dapo, 3168-3173: the token sum over the token count of the whole step
    n = jnp.sum(mask_BT) if num_items_in_batch is None else jnp.asarray(num_items_in_batch, jnp.float32)
    return jnp.sum(masked) / jnp.maximum(n, 1.0)


def dpo_loss(
    policy_chosen_logps_B,
    policy_rejected_logps_B,
    ref_chosen_logps_B,
    ref_rejected_logps_B,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
):
    """The mean over pairs of TRL's DPO loss (reverse-KL, the default f-divergence).

    Each input is a completion's summed log-probability; for ipo, its per-token mean (TRL 1.16 divides each
    pair's log-ratio by the completion's token count, dpo_trainer.py:1399-1402, which is the same number
    when the caller divides both the policy's and the reference's sum by that count).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo loss_type {loss_type!r}: expected one of {', '.join(DPO_LOSS_TYPES)}")
    # dpo_trainer.py:1350-1355 and 1383: delta_score for f_divergence_type reverse_kl
    h = (policy_chosen_logps_B - ref_chosen_logps_B) - (policy_rejected_logps_B - ref_rejected_logps_B)
    if loss_type == "sigmoid":
        # TRL 0.28.0 dpo_trainer.py:1152-1156, the conservative DPO of label smoothing; TRL 1.16's sigmoid
        # (dpo_trainer.py:1387-1388) is its label_smoothing == 0 case.
        losses = -jax.nn.log_sigmoid(beta * h) * (1 - label_smoothing) - jax.nn.log_sigmoid(-beta * h) * label_smoothing
    elif loss_type == "hinge":  # dpo_trainer.py:1390-1391
        losses = jax.nn.relu(1 - beta * h)
    else:  # ipo, dpo_trainer.py:1404
        losses = (h - 1 / (2 * beta)) ** 2
    return jnp.mean(losses)  # dpo_trainer.py:1528, with one loss type of weight 1
