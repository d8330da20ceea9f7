"""GLM cloze scoring of multi-token candidates on the tiny original-GLM fixture, against a reference written out
by hand here (layout built token by token, log_softmax of lm(...) logits summed at the candidate positions),
and the cloze loss and its gradient against the same reference and a finite difference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.fixture_models import FIX

MASK, SOP, EOP = 3, 6, 7  # the fixture's stand-in command tokens (vocab 384)
EXAMPLES = [  # (left, candidates, right): multi-token candidates of different lengths
    ([1, 11, 12, 40], [[50, 51], [60], [70, 71, 72, 73]], [15, 16, 2]),
    ([1, 20, 21, 22, 23, 24], [[80, 81, 82], [90, 91]], [2]),
    ([1, 30], [[100], [101, 102], [103, 104, 105], [106]], [31, 32, 33, 34, 2]),
]


@pytest.fixture(scope="module")
def lm():
    import glm_jax

    return glm_jax.from_pretrained(FIX / "glm-original" / "model")


def reference_score(lm, left, cand, right, include_eop=True, length_penalty=0.0, params=None):
    """Part A = left [MASK] right; Part B = <sop> cand; targets cand + <eop>; one row, no padding."""
    part_a = list(left) + [MASK] + list(right)
    mpos = len(left)
    ids = part_a + [SOP] + list(cand)
    pos = list(range(len(part_a))) + [mpos] * (len(cand) + 1)
    block = [0] * len(part_a) + list(range(1, len(cand) + 2))
    targets = list(cand) + ([EOP] if include_eop else [])
    logits = lm.module.apply(
        {"params": lm.params if params is None else params},
        jnp.asarray([ids]),
        None,
        jnp.asarray([[pos, block]]),
        jnp.asarray([len(part_a)]),
    )[0]
    logp = jax.nn.log_softmax(logits, axis=-1)
    first = len(part_a)  # the <sop> position predicts the first candidate token
    total = sum(logp[first + j, t] for j, t in enumerate(targets))
    return total / len(targets) ** length_penalty if length_penalty > 0 else total


@pytest.mark.parametrize("include_eop,length_penalty", [(True, 0.0), (False, 0.0), (True, 1.0), (False, 0.5)])
def test_scores_match_hand_reference(lm, include_eop, length_penalty):
    from glm_jax.eval import cloze

    got = cloze.score_examples(
        lm,
        EXAMPLES,
        mask_id=MASK,
        sop_id=SOP,
        eop_id=EOP,
        include_eop=include_eop,
        length_penalty=length_penalty,
        batch_size=2,
    )
    for (left, cands, right), scores in zip(EXAMPLES, got):
        assert scores.shape == (len(cands),)
        ref = [float(reference_score(lm, left, c, right, include_eop, length_penalty)) for c in cands]
        np.testing.assert_allclose(scores, ref, atol=2e-5, rtol=1e-5)


def test_batch_layout_is_glm_multi_token_cloze():
    from glm_jax.eval import cloze

    b = cloze.cloze_batch(EXAMPLES[:1], mask_id=MASK, sop_id=SOP, eop_id=EOP)
    left, cands, right = EXAMPLES[0]
    c = 2  # the four-token candidate
    n = len(left) + 1 + len(right) + 1 + len(cands[c])
    assert list(b["tokens"][0, c, :n]) == left + [MASK] + right + [SOP] + cands[c]
    assert b["prefix_len"][0, c] == len(left) + 1 + len(right)
    sep = b["prefix_len"][0, c]
    assert list(b["position_ids"][0, c, 0, sep:n]) == [len(left)] * (len(cands[c]) + 1)
    assert list(b["position_ids"][0, c, 1, sep:n]) == list(range(1, len(cands[c]) + 2))
    assert list(b["targets"][0, c, sep:n]) == cands[c] + [EOP]
    assert b["score_mask"][0, c].sum() == len(cands[c]) + 1
    assert b["choice_mask"][0].tolist() == [True, True, True]


def test_cloze_loss_and_gradient(lm):
    from glm_jax.eval import cloze

    labels = np.array([2, 0, 1])
    batch = cloze.cloze_batch(EXAMPLES, mask_id=MASK, sop_id=SOP, eop_id=EOP)
    assert batch["choice_mask"].tolist() == [[True, True, True, False], [True, True, False, False], [True] * 4]

    def loss(p):
        return cloze.cloze_loss(lm.module, p, batch, labels, length_penalty=1.0)

    def reference_loss(p):
        total = 0.0
        for (left, cands, right), y in zip(EXAMPLES, labels):
            s = jnp.stack([reference_score(lm, left, c, right, True, 1.0, params=p) for c in cands])
            total = total - jax.nn.log_softmax(s)[y]
        return total / len(EXAMPLES)

    value, grad = jax.jit(jax.value_and_grad(loss))(lm.params)
    ref_value, ref_grad = jax.jit(jax.value_and_grad(reference_loss))(lm.params)
    assert float(value) == pytest.approx(float(ref_value), abs=1e-5)
    assert float(value) > 0
    for g, r in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-5, rtol=1e-4)

    # finite difference along a random direction: (L(p + e d) - L(p - e d)) / 2e = <grad, d>
    leaves, tree = jax.tree.flatten(lm.params)
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    d = jax.tree.unflatten(tree, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    eps = 1e-3

    def shifted(sign):
        return jax.tree.map(lambda p, v: p + sign * eps * v, lm.params, d)

    loss_jit = jax.jit(loss)
    fd = (float(loss_jit(shifted(1.0))) - float(loss_jit(shifted(-1.0)))) / (2 * eps)
    analytic = sum(float(jnp.vdot(g, v)) for g, v in zip(jax.tree.leaves(grad), jax.tree.leaves(d)))
    assert fd == pytest.approx(analytic, rel=2e-2, abs=2e-3)


def test_errors(lm, tmp_path):
    from glm_jax.eval import cloze

    with pytest.raises(ValueError, match="candidate 1 has no tokens"):
        cloze.cloze_batch([([1], [[5], []], [2])], mask_id=MASK, sop_id=SOP, eop_id=EOP)
    with pytest.raises(ValueError, match="no candidates"):
        cloze.cloze_batch([([1], [], [2])], mask_id=MASK, sop_id=SOP, eop_id=EOP)
    with pytest.raises(ValueError, match="mask"):
        cloze.special_ids(lm.config.replace(mask_token_id=None), eop_id=EOP, sop_id=SOP)
