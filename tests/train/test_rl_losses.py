"""train.rl.grpo_loss / dpo_loss against TRL's own code (DESIGN.md §3.12).

TRL 1.16's losses live inside GRPOTrainer._compute_loss and DPOTrainer._compute_loss, which read the trainer and
call the model. They are called here as plain functions on a stand-in `self` holding only the attributes they
read, with a stand-in model (or log-prob function) that returns the chosen per-token log-probabilities, so TRL's
own lines compute the loss and torch autograd its gradient. The label-smoothed sigmoid DPO loss exists only up to
TRL 0.28 (one TRL can be installed), so that one is transcribed below with its line numbers.
"""

import collections
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import trl.trainer.dpo_trainer as dpo_trainer
import trl.trainer.grpo_trainer as grpo_trainer

from train.rl import DPO_LOSS_TYPES, GRPO_LOSS_TYPES, dpo_loss, grpo_loss

# Both sides compute in float32 from the same float32 inputs and differ only in summation order: over at most 96
# terms of magnitude <= ~3 that is a few ulps of the result (~1e-7), well inside 1e-6.
TOL = dict(rtol=1e-6, atol=1e-6)


def _identity(x, **_):
    return x


def _accelerator():
    return types.SimpleNamespace(
        device=torch.device("cpu"), num_processes=1, gather=_identity, gather_for_metrics=_identity, reduce=_identity
    )


def _metrics():
    return collections.defaultdict(lambda: collections.defaultdict(list))


# ---------------------------------------------------------------- GRPO


def _trl_grpo(logp, old, ref, adv, mask, *, beta, epsilon, epsilon_high, loss_type, max_len, num_items=None):
    """TRL 1.16 GRPOTrainer._compute_loss on these per-token log-probs: (loss, d loss / d logp)."""
    logp_t = torch.tensor(logp, requires_grad=True)

    def per_token_logps_and_entropies(*_args, **_kwargs):
        return logp_t, torch.zeros_like(logp_t), None

    stand_in = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=per_token_logps_and_entropies,
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=loss_type,
        epsilon_low=epsilon,
        epsilon_high=epsilon_high,
        use_vllm=False,
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=max_len,
        accelerator=_accelerator(),
        _entropy_bonus_enabled=False,
        _metrics=_metrics(),
    )
    b, t = logp.shape
    inputs = {
        "prompt_ids": torch.zeros((b, 1), dtype=torch.long),
        "prompt_mask": torch.ones((b, 1), dtype=torch.long),
        "completion_ids": torch.zeros((b, t), dtype=torch.long),
        "completion_mask": torch.tensor(mask),
        "advantages": torch.tensor(adv),
        "old_per_token_logps": torch.tensor(old),
        "ref_per_token_logps": torch.tensor(ref),
        "num_items_in_batch": torch.tensor(float(mask.sum() if num_items is None else num_items)),
    }
    loss = grpo_trainer.GRPOTrainer._compute_loss(stand_in, None, inputs)
    loss.backward()
    return loss.item(), logp_t.grad.numpy()


def _grpo_inputs(seed, b=8, t=12, empty_rows=(0,)):
    rng = np.random.default_rng(seed)
    logp = -rng.exponential(1.5, (b, t)).astype(np.float32)
    old = (logp - rng.uniform(-0.7, 0.7, (b, t))).astype(np.float32)  # ratios in (0.5, 2): both clip edges
    ref = (logp + rng.normal(0, 0.5, (b, t))).astype(np.float32)
    adv = rng.normal(0, 1, b).astype(np.float32)
    adv[1], adv[2] = 1.3, -0.9  # both signs whatever the seed
    lengths = rng.integers(1, t + 1, b)
    lengths[list(empty_rows)] = 0  # rows without completion tokens
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)
    return logp, old, ref, adv, mask


def _ours_grpo(logp, old, ref, adv, mask, **kw):
    def f(lp):
        return grpo_loss(lp, jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv), jnp.asarray(mask), **kw)

    loss, grad = jax.value_and_grad(f)(jnp.asarray(logp))
    return float(loss), np.asarray(grad)


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04, 0.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_grpo_loss_equals_trl(loss_type, beta, seed):
    logp, old, ref, adv, mask = _grpo_inputs(seed)
    eps, eps_high = 0.2, 0.28
    # The inputs reach every clipping region: the ratio above 1 + epsilon_high and below 1 - epsilon, each with a
    # positive and a negative advantage, on completion tokens.
    ratio, live = np.exp(logp - old), mask > 0
    pos, neg = (adv > 0)[:, None], (adv < 0)[:, None]
    for region in (ratio > 1 + eps_high, ratio < 1 - eps):
        assert (region & pos & live).any() and (region & neg & live).any()
    kw = dict(beta=beta, epsilon=eps, epsilon_high=eps_high, loss_type=loss_type, max_completion_length=16)
    ours, ours_grad = _ours_grpo(logp, old, ref, adv, mask, **kw)
    theirs, theirs_grad = _trl_grpo(
        logp, old, ref, adv, mask, beta=beta, epsilon=eps, epsilon_high=eps_high, loss_type=loss_type, max_len=16
    )
    np.testing.assert_allclose(ours, theirs, **TOL)
    np.testing.assert_allclose(ours_grad, theirs_grad, **TOL)
    assert np.abs(theirs_grad).max() > 1e-3  # the gradient comparison is not of zeros


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_grpo_loss_symmetric_epsilon_and_on_policy(loss_type):
    """epsilon_high None is epsilon (TRL's default); old_logp None is this policy, TRL's num_iterations == 1 case
    where old_per_token_logps is absent and TRL uses per_token_logps.detach()."""
    logp, old, ref, adv, mask = _grpo_inputs(3)
    kw = dict(beta=0.1, epsilon=0.2, loss_type=loss_type, max_completion_length=12)
    ours, ours_grad = _ours_grpo(logp, old, ref, adv, mask, epsilon_high=None, **kw)
    theirs, theirs_grad = _trl_grpo(
        logp, old, ref, adv, mask, beta=0.1, epsilon=0.2, epsilon_high=0.2, loss_type=loss_type, max_len=12
    )
    np.testing.assert_allclose(ours, theirs, **TOL)
    np.testing.assert_allclose(ours_grad, theirs_grad, **TOL)

    def on_policy(lp):
        return grpo_loss(lp, None, jnp.asarray(ref), jnp.asarray(adv), jnp.asarray(mask), epsilon_high=0.28, **kw)

    ours, ours_grad = jax.value_and_grad(on_policy)(jnp.asarray(logp))
    theirs, theirs_grad = _trl_grpo(
        logp, logp, ref, adv, mask, beta=0.1, epsilon=0.2, epsilon_high=0.28, loss_type=loss_type, max_len=12
    )
    np.testing.assert_allclose(float(ours), theirs, **TOL)
    np.testing.assert_allclose(np.asarray(ours_grad), theirs_grad, **TOL)


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_grpo_loss_without_completion_tokens(loss_type):
    """Every row empty (TRL clamps its denominators to 1, so the loss is 0, not NaN), and beta 0 without a ref."""
    logp, old, ref, adv, mask = _grpo_inputs(4, empty_rows=range(8))
    assert mask.sum() == 0
    kw = dict(beta=0.04, epsilon=0.2, epsilon_high=0.28, loss_type=loss_type, max_completion_length=12)
    ours, ours_grad = _ours_grpo(logp, old, ref, adv, mask, **kw)
    theirs, theirs_grad = _trl_grpo(
        logp, old, ref, adv, mask, beta=0.04, epsilon=0.2, epsilon_high=0.28, loss_type=loss_type, max_len=12
    )
    assert ours == theirs == 0.0 and not ours_grad.any() and not theirs_grad.any()

    logp, old, ref, adv, mask = _grpo_inputs(5, empty_rows=(0, 3))
    loss = grpo_loss(*map(jnp.asarray, (logp, old)), None, *map(jnp.asarray, (adv, mask)), **{**kw, "beta": 0.0})
    theirs, _ = _trl_grpo(
        logp, old, ref, adv, mask, beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_type=loss_type, max_len=12
    )
    np.testing.assert_allclose(float(loss), theirs, **TOL)


def test_grpo_dapo_divides_by_the_whole_steps_token_count():
    """dapo's num_items_in_batch: the token count of the step, larger than this microbatch's."""
    logp, old, ref, adv, mask = _grpo_inputs(6)
    n = float(mask.sum()) * 3 + 5
    kw = dict(beta=0.04, epsilon=0.2, epsilon_high=0.28, loss_type="dapo", max_completion_length=12)
    ours, ours_grad = _ours_grpo(logp, old, ref, adv, mask, num_items_in_batch=n, **kw)
    theirs, theirs_grad = _trl_grpo(
        logp, old, ref, adv, mask, beta=0.04, epsilon=0.2, epsilon_high=0.28, loss_type="dapo", max_len=12, num_items=n
    )
    np.testing.assert_allclose(ours, theirs, **TOL)
    np.testing.assert_allclose(ours_grad, theirs_grad, **TOL)


def test_grpo_loss_rejects_unknown_type():
    x = jnp.zeros((1, 2))
    with pytest.raises(ValueError, match="dr_grpo"):
        grpo_loss(x, x, x, jnp.zeros(1), x, beta=0, epsilon=0.2, epsilon_high=0.2, loss_type="gspo",
                  max_completion_length=2)  # fmt: skip


# ---------------------------------------------------------------- DPO


class _LogProbModel:
    """Stands in for the model in DPOTrainer._compute_loss: returns the given per-token log-probs."""

    def __init__(self, log_probs):
        self.log_probs = log_probs

    def __call__(self, **_kwargs):
        zeros = torch.zeros_like(self.log_probs)
        return types.SimpleNamespace(
            log_probs=self.log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(), aux_loss=None
        )


def _dpo_inputs(seed, b=6, t=10):
    """Per-token policy log-probs [2B, T-1] (chosen rows, then rejected) on the completion tokens, the completion
    mask [2B, T] (a prompt, then 1..T-2 completion tokens, then padding) and the reference's summed log-probs."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, t - 1, 2 * b)
    prompt = rng.integers(1, t - lengths)
    pos = np.arange(t)[None, :]
    mask = ((pos >= prompt[:, None]) & (pos < (prompt + lengths)[:, None])).astype(np.int64)
    per_token = (-rng.exponential(1.0, (2 * b, t - 1)) * mask[:, 1:]).astype(np.float32)
    ref = (per_token.sum(1) + rng.normal(0, 2.0, 2 * b)).astype(np.float32)
    return per_token, mask, ref


def _trl_dpo(per_token, mask, ref, *, beta, loss_type):
    """TRL 1.16 DPOTrainer._compute_loss with precomputed reference log-probs: (loss, d loss / d per-token)."""
    log_probs = torch.tensor(per_token, requires_grad=True)
    stand_in = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=_accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics=_metrics(),
        _total_train_tokens=0,
        _tp_size=1,
    )
    ref_c, ref_r = torch.tensor(ref).chunk(2)
    inputs = {
        "input_ids": torch.ones(mask.shape, dtype=torch.long),
        "attention_mask": torch.ones(mask.shape, dtype=torch.long),
        "completion_mask": torch.tensor(mask),
        "ref_chosen_logps": ref_c,
        "ref_rejected_logps": ref_r,
    }
    loss = dpo_trainer.DPOTrainer._compute_loss(stand_in, _LogProbModel(log_probs), inputs, False)
    loss.backward()
    return loss.item(), log_probs.grad.numpy(), stand_in._metrics["train"]


def _ours_dpo(per_token, mask, ref, **kw):
    """dpo_loss on the summed log-probs (per-token means for ipo) and its gradient per token."""
    count = mask.sum(1).astype(np.float32) if kw["loss_type"] == "ipo" else np.ones(mask.shape[0], np.float32)
    policy, ref = jnp.asarray(per_token.sum(1) / count), jnp.asarray(ref / count)
    b = policy.shape[0] // 2

    def f(p):
        return dpo_loss(p[:b], p[b:], ref[:b], ref[b:], **kw)

    loss, grad = jax.value_and_grad(f)(policy)
    # a completion's log-prob is the sum (or mean) of its tokens', so each token's gradient is the sequence's
    return float(loss), (np.asarray(grad) / count)[:, None] * mask[:, 1:]


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_dpo_loss_equals_trl(loss_type, beta, seed):
    per_token, mask, ref = _dpo_inputs(seed)
    ours, ours_grad = _ours_dpo(per_token, mask, ref, beta=beta, loss_type=loss_type, label_smoothing=0.0)
    theirs, theirs_grad, _ = _trl_dpo(per_token, mask, ref, beta=beta, loss_type=loss_type)
    np.testing.assert_allclose(ours, theirs, **TOL)
    # TRL sums every position of log_probs, which the model zeroes off the completion (labels -100): only the
    # completion tokens' gradients reach the weights
    np.testing.assert_allclose(ours_grad, theirs_grad * mask[:, 1:], **TOL)
    assert np.abs(theirs_grad).max() > 1e-3


def test_dpo_hinge_inputs_reach_both_sides():
    """The hinge comparison above covers pairs on both sides of the kink (beta·h above and below 1)."""
    per_token, mask, ref = _dpo_inputs(0)
    policy = per_token.sum(1)
    h = (policy[:6] - ref[:6]) - (policy[6:] - ref[6:])
    assert (0.5 * h > 1).any() and (0.5 * h < 1).any()


def _trl028_sigmoid(h, beta, ls):
    """TRL 0.28.0 trl/trainer/dpo_trainer.py:1152-1156 (DPOTrainer.dpo_loss, loss_type "sigmoid", `logits` = h at
    1136-1142 with reference_free False), transcribed as written, then `losses.mean()` as in get_batch_loss_metrics."""
    logits = torch.tensor(h)
    losses = (
        -torch.nn.functional.logsigmoid(beta * logits) * (1 - ls) - torch.nn.functional.logsigmoid(-beta * logits) * ls
    )
    return losses.mean().item()


@pytest.mark.parametrize("ls", [0.0, 0.1, 0.3, 0.5])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_dpo_sigmoid_label_smoothing_equals_trl_028(ls, beta):
    rng = np.random.default_rng(7)
    pc, pr, rc, rr = (rng.normal(-20, 6, 16).astype(np.float32) for _ in range(4))
    ours = dpo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), beta=beta, loss_type="sigmoid", label_smoothing=ls)
    h = (pc - pr) - (rc - rr)  # TRL 0.28's logits = logratios - ref_logratios
    np.testing.assert_allclose(float(ours), _trl028_sigmoid(h, beta, ls), **TOL)


@pytest.mark.parametrize("beta", [0.1, 0.25, 1.0])
def test_dpo_step_one_values(beta):
    """With the policy equal to the reference (step 1), h = 0: sigmoid log 2 at any label smoothing, ipo
    1/(4·beta²), hinge 1; TRL's trainer gives the same."""
    rng = np.random.default_rng(8)
    pc, pr = rng.normal(-20, 6, 8).astype(np.float32), rng.normal(-20, 6, 8).astype(np.float32)
    same = dict(policy_chosen_logps_B=pc, policy_rejected_logps_B=pr, ref_chosen_logps_B=pc, ref_rejected_logps_B=pr)
    for ls in (0.0, 0.2):
        loss = dpo_loss(*same.values(), beta=beta, loss_type="sigmoid", label_smoothing=ls)
        np.testing.assert_allclose(float(loss), math.log(2), rtol=1e-6)
    np.testing.assert_allclose(float(dpo_loss(*same.values(), beta=beta, loss_type="ipo")), 1 / (4 * beta**2), 1e-6)
    assert float(dpo_loss(*same.values(), beta=beta, loss_type="hinge")) == 1.0

    per_token, mask, _ = _dpo_inputs(9)
    ref = per_token.sum(1)
    for loss_type, want in (("sigmoid", math.log(2)), ("ipo", 1 / (4 * beta**2)), ("hinge", 1.0)):
        theirs, _, _ = _trl_dpo(per_token, mask, ref, beta=beta, loss_type=loss_type)
        np.testing.assert_allclose(theirs, want, rtol=1e-6)


def test_dpo_loss_rejects_unknown_type():
    x = jnp.zeros(2)
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="robust", label_smoothing=0.0)
