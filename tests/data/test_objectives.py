"""Span samplers and the objective mixture of THUDM/GLM's construct_blocks, on synthetic token rows."""

import json

import numpy as np
import pytest

from glm_jax.data import objectives as ob
from glm_jax.data.config import DataConfig

EOS, CLS, MASK, SMASK, GMASK, SOP, EOP, DBLOCK, DOT = 2, 3, 4, 5, 6, 7, 8, 9, 13
IDS = ob.SpecialIds(eos=EOS, cls=CLS, mask=MASK, smask=SMASK, gmask=GMASK, sop=SOP, eop=EOP, dblock=DBLOCK)
IS_END = np.zeros(100, bool)
IS_END[DOT] = True


def opts(**kw):
    cfg = DataConfig(**kw)
    return {**cfg.as_dict(), **cfg.resolved()}


def packed(rng, doc_lens, final_eos=True):
    """[CLS] doc <eos> [CLS] doc ... with text ids 20..99 and a '.' every ~12 tokens."""
    toks, seg = [], []
    for j, L in enumerate(doc_lens):
        body = rng.integers(20, 100, L)
        body[rng.random(L) < 1 / 12] = DOT
        piece = [CLS] + body.tolist() + ([EOS] if final_eos or j < len(doc_lens) - 1 else [])
        toks += piece
        seg += [j + 1] * len(piece)
    t = np.array(toks, np.int32)
    return ob.Sample(t, (t != CLS).astype(np.int32), np.array(seg, np.int32))


def test_span_length_distribution_matches_spec():
    cdf = ob.span_length_cdf(3.0, 40)
    p = np.diff(np.concatenate([[0.0], cdf]))
    assert len(p) == 39
    np.testing.assert_allclose(p[:8], [0.157, 0.236, 0.236, 0.177, 0.106, 0.053, 0.023, 0.009], atol=6e-4)
    assert abs(float(np.dot(p, np.arange(1, 40))) - 3.157) < 1e-3


def test_draw_lengths_stops_at_first_reaching_budget():
    cdf = ob.span_length_cdf()
    for seed in range(50):
        L = ob.draw_lengths(np.random.default_rng(seed), cdf, 76)
        assert L.sum() >= 76 and L[:-1].sum() < 76 and L.min() >= 1 and L.max() <= 39
    assert len(ob.draw_lengths(np.random.default_rng(0), cdf, 0)) == 0


@pytest.mark.parametrize("final_eos", [True, False])
def test_place_spans_follows_reference_rules(final_eos):
    cdf = ob.span_length_cdf()
    placed = 0
    for seed in range(300):
        rng = np.random.default_rng(seed)
        s = packed(rng, rng.integers(5, 200, rng.integers(1, 4)).tolist(), final_eos)
        t = s.tokens
        lengths = ob.draw_lengths(rng, cdf, int(0.15 * len(t)))
        spans = ob.place_spans(t, lengths, rng, eos_id=EOS, cls_id=CLS)
        if spans is None:
            continue
        placed += 1
        assert sorted(e - st for st, e in spans) == sorted(lengths.tolist())
        covered = np.zeros(len(t), bool)
        for st, e in sorted(spans):
            assert 0 <= st < e <= len(t)
            assert not covered[max(st - 1, 0) : e].any(), "spans must be separated by an unmasked token"
            covered[st:e] = True
        assert not (covered & ((t == CLS) | (t == EOS))).any()
        if not final_eos:
            assert not covered[-1]
        # documents other than the longest get at most int(0.15 * region) masked tokens
        regions = ob.document_regions(t, EOS, CLS)
        for off, L in regions[:-1]:
            assert covered[off : off + L].sum() <= int(0.15 * L)
    assert placed > 250


def test_document_regions_exclude_cls_eos_and_unterminated_last_token():
    t = np.array([CLS, 20, 21, EOS, CLS, 22, 23, 24], np.int32)
    assert sorted(ob.document_regions(t, EOS, CLS)) == [(1, 2), (5, 2)]
    t2 = np.array([CLS, 20, 21, 22, EOS], np.int32)
    assert sorted(ob.document_regions(t2, EOS, CLS)) == [(1, 3), (5, 0)]


def test_single_span_placement_is_uniform():
    t = np.array([CLS] + [30] * 40 + [EOS], np.int32)  # region [1, 41), span length 10 -> starts 1..31
    starts = [ob.place_spans(t, [10], np.random.default_rng(s), eos_id=EOS, cls_id=CLS)[0][0] for s in range(3000)]
    assert min(starts) == 1 and max(starts) == 31
    counts = np.bincount(starts, minlength=32)[1:]
    assert counts.min() > 50 and abs(np.mean(starts) - 16) < 0.5


def test_sentence_spans_on_spec_example_c(fixtures_dir):
    case = json.loads((fixtures_dir / "blank-infilling" / "layout.json").read_text())["cases"][1]
    t = np.array(case["input"]["tokens"])
    is_end = np.zeros(60000, bool)
    is_end[13] = True  # GPT-2 '.'
    spans = ob.sentence_spans(t, is_end, eos_id=50256, cls_id=50259)
    assert spans == [(1, 9), (9, 15), (15, 22)]


def test_sentence_spans_multi_document_rules():
    # [CLS] a . b <eos> [CLS] c . d  -> "b" (no sentence end before eos) is not a sentence; the second
    # [CLS] starts a sentence; the unterminated tail "d" is one.
    t = np.array([CLS, 20, DOT, 21, EOS, CLS, 22, DOT, 23], np.int32)
    assert ob.sentence_spans(t, IS_END, eos_id=EOS, cls_id=CLS) == [(1, 3), (5, 8), (8, 9)]


def test_choose_sentences_reaches_ratio_minimally():
    sents = [(i * 10, i * 10 + 10) for i in range(20)]
    for seed in range(20):
        chosen = ob.choose_sentences(sents, 200, np.random.default_rng(seed), 0.15)
        total = sum(e - s for s, e in chosen)
        assert total >= 30 and total - (chosen[-1][1] - chosen[-1][0]) < 30


def test_token_level_mask_ratio_is_15_percent():
    o = opts(mixture="glm_large")
    ratios = []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        s = packed(rng, [int(rng.integers(300, 600))])
        row = ob.token_level(s, rng, o, IDS, 512, {})
        L, sep = len(row["tokens"]), row["sep"]
        S = int(np.sum(row["tokens"][sep:] == SOP))
        assert L <= 512
        ratios.append((L - sep - S) / (L - 2 * S))
    assert 0.14 <= np.mean(ratios) <= 0.16


def test_token_level_row_fits_seq_len_and_blocks_only_part_b_with_dblock():
    o = opts(mixture="glm_10b", block_mask_prob=1.0)
    rng = np.random.default_rng(0)
    row = ob.token_level(packed(rng, [600]), rng, o, IDS, 256, {})
    sep, t = row["sep"], row["tokens"]
    assert len(t) <= 256
    assert not np.isin(t[:sep], [DBLOCK]).any()
    assert set(t[sep:].tolist()) == {SOP, DBLOCK}
    assert (row["targets"][sep:] != DBLOCK).all()


def test_document_level_prefix_and_single_span_branches():
    o = opts(mixture="glm_10b")
    rng = np.random.default_rng(1)
    multi = packed(rng, [30, 40])  # several documents -> always prefix layout
    row = ob.document_level(multi, 50, rng, o, IDS, 512, {})
    n, sep = len(multi), row["sep"]
    assert sep == n - 50 + 1 and row["tokens"][sep - 1] == GMASK and row["tokens"][sep] == SOP
    assert row["targets"][-1] == EOS and EOP not in row["targets"].tolist()
    single = packed(rng, [60])
    row = ob.document_level(single, 30, rng, o, IDS, 512, {}, infill_prob=0.0)  # single-span infill
    t, sep = row["tokens"].tolist(), row["sep"]
    assert t[:sep].count(GMASK) == 1 and t[sep - 1] == EOS and len(t) == len(single) + 2
    assert t[sep] == SOP and row["targets"][-1] == EOP and len(t) - sep == 31


def test_generation_length_range():
    gs = [ob.generation_length([100, 80], np.random.default_rng(s), 0.25) for s in range(500)]
    assert min(gs) == 20 and max(gs) == 98


@pytest.mark.parametrize("per_sample", [False, True])
def test_mixture_frequencies_and_granularity(per_sample):
    o = opts(mixture="glm_10b", short_seq_prob=0.0)
    counts = np.zeros(3)
    mixed_batches = 0
    for b in range(600):
        rng = np.random.default_rng([b, 0])
        samples = [packed(np.random.default_rng([b, j]), [50]) for j in range(4)]
        rngs = [np.random.default_rng([b, 1, j]) for j in range(4)]
        rows = ob.blank_infilling_rows(samples, rng, rngs, o, IDS, 128, IS_END, {}, per_sample=per_sample)
        modes = [r["mode"] for r in rows]
        mixed_batches += len(set(modes)) > 1
        for m in modes:
            counts[m] += 1
    freq = counts / counts.sum()
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2], atol=0.04)
    assert (mixed_batches > 100) if per_sample else (mixed_batches == 0)


def test_short_sequence_split_window():
    rng = np.random.default_rng(3)
    s = packed(rng, [400])
    out = ob.split_short(s, 64, rng, IDS, IS_END)
    assert out.tokens[0] == CLS and 32 < len(out) <= 65 and out.loss_mask[0] == 0
    assert len(ob.split_short(packed(rng, [20]), 64, rng, IDS, IS_END)) == 22


def test_causal_rows_shift_and_segments():
    s = packed(np.random.default_rng(0), [5, 6])
    row = ob.causal(s, 64, segment_ids=True)
    t, y = row["tokens"], row["targets"]
    assert (t[1:] == y[:-1]).all() and row["sep"] == 0
    boundary = int(np.flatnonzero(s.tokens == EOS)[0])  # predicting doc 2's [CLS] from doc 1's <eos>
    assert row["loss_mask"][boundary] == 0 and row["loss_mask"].sum() == len(t) - 1
    assert row["position_ids"][boundary + 1] == 0


# THUDM/GLM's released pretraining scripts, as the blank-infilling spec's table of released configs transcribes them
# (config/ds_block_*.sh): bert (token-level) and gap-sentence probabilities and the other mixture flags.
RELEASED_MIXTURES = {
    "glm_large": dict(bert_prob=1.0, gap_sentence_prob=0.0, task_mask=False, block_mask_prob=0.0),
    "glm_10b": dict(
        bert_prob=0.5, gap_sentence_prob=0.3, gpt_min_ratio=0.25, task_mask=True, block_mask_prob=0.1,
        short_seq_prob=0.02, single_span_prob=0.0,
    ),
    "glm_10b_longer": dict(
        bert_prob=0.4, gap_sentence_prob=0.3, gpt_min_ratio=0.25, task_mask=True, block_mask_prob=0.1,
        short_seq_prob=0.5, single_span_prob=0.05,
    ),
    "glm_large_chinese": dict(
        bert_prob=0.4, gap_sentence_prob=0.3, gpt_min_ratio=0.25, task_mask=True, block_mask_prob=0.1,
        short_seq_prob=0.02, single_span_prob=0.0,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(RELEASED_MIXTURES))
def test_named_mixtures_match_the_released_scripts(name):
    from glm_jax.data.config import MIXTURES

    got = MIXTURES[name]
    assert {k: got[k] for k in RELEASED_MIXTURES[name]} == RELEASED_MIXTURES[name]
