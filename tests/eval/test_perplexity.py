"""Sliding-window perplexity against a hand computation (one forward per window, log_softmax, each token once),
the stride rule's coverage, and LAMBADA-style accuracy against the lm-eval backend's loglikelihoods."""

import math

import jax
import numpy as np
import pytest
import torch  # noqa: F401  (a requirement of this test)
import transformers  # noqa: F401  (a requirement of this test)
from helpers import eval_models


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    import glm_jax

    path = tmp_path_factory.mktemp("ppl") / "model"
    eval_models.build_glm4(path, seed=1)
    return glm_jax.from_pretrained(path), path


@pytest.mark.parametrize("n,max_len,stride,first", [(50, 16, 5, 1), (50, 16, 15, 1), (7, 16, 8, 1), (40, 10, 1, 3)])
def test_stride_windows_score_every_token_once(n, max_len, stride, first):
    from glm_jax.eval.perplexity import stride_windows

    wins = stride_windows(n, max_len, stride, first)
    scored = [t for _, s, e in wins for t in range(s, e)]
    assert scored == list(range(first, n))
    for i, (b, s, e) in enumerate(wins):
        assert e - b <= max_len and b < s
        if i:  # after the first window: at least max_len - stride tokens of context
            assert s - b >= min(max_len - stride, s)


def reference_nll(lm, seq, max_len, stride, first):
    """HF-guide loop written out: forward seq[b:e], score tokens [max(prev_end, first), e) from their left context."""
    total, count, prev_end, b = 0.0, 0, 0, 0
    while prev_end < len(seq):
        e = min(b + max_len, len(seq))
        logp = np.asarray(jax.nn.log_softmax(lm(np.asarray([seq[b:e]]))[0], axis=-1))
        for t in range(max(prev_end, first, b + 1), e):
            total -= float(logp[t - b - 1, seq[t]])
            count += 1
        prev_end, b = e, b + stride
    return total, count


@pytest.mark.parametrize("max_len,stride,prefix", [(16, 5, ()), (16, 15, (1,)), (64, 32, (1,))])
def test_perplexity_matches_hand_computation(model, max_len, stride, prefix):
    from glm_jax.eval.perplexity import perplexity

    lm, _ = model
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 300, size=45).tolist()
    res = perplexity(lm, tokens, max_len=max_len, stride=stride, prefix=prefix, batch_size=4)
    seq = list(prefix) + tokens
    nll, count = reference_nll(lm, seq, max_len, stride, max(1, len(prefix)))
    assert res["tokens"] == count == len(seq) - max(1, len(prefix))
    assert res["nll"] == pytest.approx(nll, abs=1e-4)
    assert res["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    if max_len >= len(seq):  # one window: the plain full-context forward
        assert res["windows"] == 1


def test_lambada_matches_harness_loglikelihoods(model, tmp_path):
    import lm_eval  # noqa: F401  (a requirement of this test)
    from lm_eval.api.instance import Instance

    from glm_jax.eval.harness import GLMLM
    from glm_jax.eval.perplexity import lambada
    from glm_jax.eval.tokenizer import EvalTokenizer

    lm, path = model
    lines = eval_models.SENTENCES[:5]
    f = tmp_path / "lambada.txt"
    f.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    res = lambada(lm, EvalTokenizer(path), f, max_len=64)
    h = GLMLM(pretrained=str(path), max_length=64)
    reqs = [Instance("loglikelihood", {}, (ln.rsplit(" ", 1)[0], " " + ln.rsplit(" ", 1)[1]), 0) for ln in lines]
    out = h.loglikelihood(reqs, disable_tqdm=True)
    assert res["passages"] == 5
    assert res["acc"] == sum(g for _, g in out) / 5
    assert res["ppl"] == pytest.approx(math.exp(-sum(ll for ll, _ in out) / 5), rel=1e-6)


def test_errors(model, tmp_path):
    from glm_jax.eval.perplexity import lambada, perplexity, read_text
    from glm_jax.eval.tokenizer import EvalTokenizer

    lm, path = model
    with pytest.raises(ValueError, match="stride"):
        perplexity(lm, [5, 6, 7], max_len=8, stride=8)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt: the file is empty"):
        read_text(empty)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(ValueError, match="bad.txt: not UTF-8"):
        read_text(bad)
    one = tmp_path / "one.txt"
    one.write_text("two words\nsingle\n", encoding="utf-8")
    with pytest.raises(ValueError, match="one.txt, line 2"):
        lambada(lm, EvalTokenizer(path), one, max_len=32)
