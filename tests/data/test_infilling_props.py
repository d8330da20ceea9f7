"""Property tests of the blank-infilling layout: rules of THUDM/GLM's make_block_data, checked on random inputs."""

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from glm_jax import infilling
from glm_jax.data.batching import attention_mask

MASK, SOP, EOP = 1, 2, 3  # text tokens are drawn from 10.. so they never collide with these


@st.composite
def doc_and_spans(draw):
    n = draw(st.integers(1, 60))
    tokens = draw(st.lists(st.integers(10, 99), min_size=n, max_size=n))
    cuts = sorted(set(draw(st.lists(st.integers(0, n), max_size=12))))
    pairs = [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts) - 1, 2)]
    spans = [p for p in pairs if p[1] > p[0] and draw(st.booleans())]
    order = draw(st.permutations(range(len(spans))))
    return tokens, [spans[i] for i in order]


@settings(max_examples=150, deadline=None)
@given(doc_and_spans(), st.booleans())
def test_layout_rules(case, block_position):
    tokens, spans = case
    out = infilling.layout(tokens, spans, mask_id=MASK, sop_id=SOP, eop_id=EOP, block_position=block_position)
    t, y, lm = out["tokens"], out["targets"], out["loss_mask"]
    pos, blk, sep = out["position_ids"], out["block_position_ids"], out["sep"]
    n, S, masked = len(tokens), len(spans), sum(e - s for s, e in spans)
    T = n + 2 * S
    assert len(t) == len(y) == len(lm) == len(pos) == len(blk) == T
    assert sep == n - masked + S

    # Part A: the text with each span replaced by one mask, in text order; targets = inputs, no loss.
    expect_a, last = [], 0
    for s, e in sorted(spans):
        expect_a += tokens[last:s] + [MASK]
        last = e
    expect_a += tokens[last:]
    assert t[:sep].tolist() == expect_a and y[:sep].tolist() == expect_a
    assert lm.tolist() == [0] * sep + [1] * (T - sep)
    assert pos[:sep].tolist() == list(range(sep)) and not blk[:sep].any()

    # Part B: spans in the given order, each [sop] + span -> span + [eop], at its mask's Part A index.
    mask_index = {s: i for i, s in enumerate(sorted(s for s, _ in spans))}
    at = sep
    for s, e in spans:
        L = e - s
        a_index = [i for i, tok in enumerate(expect_a) if tok == MASK][mask_index[s]]
        assert t[at : at + L + 1].tolist() == [SOP] + tokens[s:e]
        assert y[at : at + L + 1].tolist() == tokens[s:e] + [EOP]
        assert pos[at : at + L + 1].tolist() == [a_index] * (L + 1)
        assert blk[at : at + L + 1].tolist() == (list(range(1, L + 2)) if block_position else [1] * (L + 1))
        at += L + 1
    assert at == T


@settings(max_examples=150, deadline=None)
@given(doc_and_spans())
def test_part_a_and_part_b_reconstruct_document_and_each_masked_token_is_a_target_once(case):
    tokens, spans = case
    out = infilling.layout(tokens, spans, mask_id=MASK, sop_id=SOP, eop_id=EOP)
    t, y, pos, sep = out["tokens"].tolist(), out["targets"].tolist(), out["position_ids"].tolist(), out["sep"]
    # Collect Part B targets per mask index (from the position channel), stripping each block's eop.
    filled, seen = {}, 0
    cur = None
    for q in range(sep, len(t)):
        if t[q] == SOP:
            cur = pos[q]
            assert cur not in filled, "two Part B blocks for one mask"
            filled[cur] = []
        if y[q] == EOP:
            continue
        filled[cur].append(y[q])
        seen += 1
    rebuilt = []
    for i, tok in enumerate(t[:sep]):
        rebuilt += filled.pop(i) if tok == MASK else [tok]
    assert rebuilt == list(tokens) and not filled
    assert seen == sum(e - s for s, e in spans)  # every masked token is a loss target exactly once


@settings(max_examples=60, deadline=None)
@given(doc_and_spans())
def test_no_query_sees_the_token_it_predicts(case):
    tokens, spans = case
    out = infilling.layout(tokens, spans, mask_id=MASK, sop_id=SOP, eop_id=EOP)
    T, sep = len(out["tokens"]), out["sep"]
    allowed = attention_mask(np.array([sep]), T)[0]
    # origin of each output token in the input (-1 for mask/sop/eop), computed from the spec layout.
    kept = [i for i in range(len(tokens)) if not any(s < i < e for s, e in spans)]
    starts = {s for s, _ in spans}
    origin_in = [-1 if i in starts else i for i in kept]
    origin_tgt = list(origin_in)
    for s, e in spans:
        origin_in += [-1] + list(range(s, e))
        origin_tgt += list(range(s, e)) + [-1]
    for q in range(sep, T):
        if out["loss_mask"][q] and origin_tgt[q] >= 0:
            visible = {origin_in[k] for k in range(T) if allowed[q, k]}
            assert origin_tgt[q] not in visible
    # Part A never sees Part B; Part B sees all of Part A and itself.
    assert not allowed[:sep, sep:].any() and allowed[sep:, :sep].all()
    assert all(allowed[q, q] for q in range(T))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(10, 99), min_size=2, max_size=50), st.data())
def test_prefix_layout_rules(tokens, data):
    n = len(tokens)
    k = data.draw(st.integers(1, n - 1))
    out = infilling.prefix_layout(tokens, k, gmask_id=4, sop_id=SOP)
    t, y = out["tokens"].tolist(), out["targets"].tolist()
    assert out["sep"] == k + 1 and len(t) == n + 1
    assert t[: k + 2] == tokens[:k] + [4, SOP] and y[k + 1 :] == tokens[k:]
    assert t[k + 2 :] == y[k + 1 : -1]  # next-token structure in the generated part
    assert out["position_ids"].tolist() == list(range(k + 1)) + [k] * (n - k)
    assert out["block_position_ids"].tolist() == [0] * (k + 1) + list(range(1, n - k + 1))


@settings(max_examples=80, deadline=None)
@given(doc_and_spans(), st.data())
def test_overlapping_spans_always_rejected(case, data):
    tokens, spans = case
    assume(spans)  # a draw without spans has nothing to overlap: hypothesis draws another instead of passing it
    s, e = spans[0]  # e > s: doc_and_spans keeps only non-empty spans
    inner = data.draw(st.integers(s, e - 1))
    bad = spans + [(inner, min(len(tokens), inner + data.draw(st.integers(1, 5))))]  # starts inside spans[0]
    with pytest.raises(ValueError):
        infilling.layout(tokens, bad, mask_id=MASK, sop_id=SOP, eop_id=EOP)
