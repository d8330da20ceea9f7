"""GLM pretraining objectives: seeded span samplers and the per-batch mixture of THUDM/GLM's
`ConstructBlockStrategy` (blocklm_utils.py).

Every function takes an explicit `np.random.Generator`; nothing reads global random state.
A *sample* is a packed token row `[CLS] doc <eos> [CLS] doc ...` (see packing.py) with a loss mask
(0 at every [CLS]) and 1-based document ids `seg`. A *row* is what one batch row holds: the output
of `glm_jax.infilling.layout` / `prefix_layout` (or the causal shift) plus `seg`, `mode` and `sep`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from glm_jax import infilling
from glm_jax.data.spans import (
    choose_sentences,
    document_regions,
    draw_lengths,
    generation_length,
    place_spans,
    sentence_spans,
    span_length_cdf,
)

# The span samplers live in spans.py; their names stay reachable here, where the objectives use them.
__all__ = [
    "MODES",
    "Sample",
    "SpecialIds",
    "blank_infilling_rows",
    "causal",
    "choose_sentences",
    "document_level",
    "document_regions",
    "draw_lengths",
    "generation_length",
    "place_spans",
    "sentence_level",
    "sentence_spans",
    "span_length_cdf",
    "split_short",
    "token_level",
]

MODES = ("token", "sentence", "document", "causal", "prefix")  # row["mode"] indexes this tuple


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    eos: int
    sop: int | None = None
    eop: int | None = None
    mask: int | None = None
    smask: int | None = None
    gmask: int | None = None
    cls: int | None = None
    dblock: int | None = None


@dataclasses.dataclass
class Sample:
    tokens: np.ndarray  # int32 [N]
    loss_mask: np.ndarray  # int32 [N]
    seg: np.ndarray  # int32 [N], 1-based document index inside the sample

    def __len__(self):
        return int(self.tokens.shape[0])

    def head(self, n: int) -> Sample:
        return Sample(self.tokens[:n], self.loss_mask[:n], self.seg[:n])


def _row_from_layout(out: dict, sample: Sample, mode: str) -> dict:
    out["seg"] = sample.seg[out.pop("source_index")]
    out["mode"] = MODES.index(mode)
    return out


def _part_b_order(spans, rng, shuffle: bool):
    if not shuffle:
        return sorted(spans)
    return [spans[j] for j in rng.permutation(len(spans))]


def token_level(
    sample: Sample, rng: np.random.Generator, o, ids: SpecialIds, seq_len: int, stats: dict, single_span: bool = False
) -> dict:
    """Token-level blanks ([MASK], Poisson spans until >= bert_ratio), trimmed so T <= seq_len."""
    cdf = span_length_cdf(o["avg_block_length"], o["max_block_length"])
    n0, spans = len(sample), []
    for _ in range(4):
        if single_span:
            stream = np.searchsorted(cdf, rng.random(1), side="right") + 1
        else:
            stream = draw_lengths(rng, cdf, int(o["bert_ratio"] * n0))
        csum = np.cumsum(stream)
        n = n0
        while True:
            m = (
                1
                if single_span
                else (0 if int(o["bert_ratio"] * n) <= 0 else int(np.searchsorted(csum, int(o["bert_ratio"] * n))) + 1)
            )
            if n + 2 * m <= seq_len:
                break
            n = seq_len - 2 * m
        sample_n = sample.head(n)
        placed = place_spans(sample_n.tokens, stream[:m], rng, eos_id=ids.eos, cls_id=ids.cls, ratio=o["bert_ratio"])
        if placed is not None:
            sample, spans = sample_n, placed
            break
        stats["span_placement_retries"] = stats.get("span_placement_retries", 0) + 1
    else:
        sample = sample.head(min(n0, seq_len))
    if not spans:
        stats["samples_without_spans"] = stats.get("samples_without_spans", 0) + 1
    out = infilling.layout_with_source(
        sample.tokens,
        _part_b_order(spans, rng, o["shuffle_blocks"]),
        mask_id=ids.mask,
        sop_id=ids.sop,
        eop_id=ids.eop,
        block_position=o["block_position"],
        eos_id=ids.eos,
    )
    p = o["block_mask_prob"]
    if p > 0:  # [dBLOCK] corruption of Part B inputs (not the sop), seeded here (reference: global random)
        t = out["tokens"]
        hit = (np.arange(len(t)) >= out["sep"]) & (t != ids.sop) & (rng.random(len(t)) < p)
        t[hit] = ids.dblock
    return _row_from_layout(out, sample, "token")


def sentence_level(
    sample: Sample, rng: np.random.Generator, o, ids: SpecialIds, seq_len: int, is_end_V: np.ndarray, stats: dict
) -> dict:
    """Whole sentences ([sMASK] with task_mask) until >= gap_sentence_ratio, trimmed so T <= seq_len."""
    seed = int(rng.integers(2**63))
    n = min(len(sample), seq_len)
    for _ in range(16):
        sents = sentence_spans(sample.tokens[:n], is_end_V, eos_id=ids.eos, cls_id=ids.cls)
        spans = choose_sentences(sents, n, np.random.default_rng(seed), o["gap_sentence_ratio"])
        excess = n + 2 * len(spans) - seq_len
        if excess <= 0:
            break
        n -= excess
    else:
        spans = []
    if not spans:
        stats["samples_without_spans"] = stats.get("samples_without_spans", 0) + 1
    mask_id = ids.smask if o["task_mask"] and ids.smask is not None else ids.mask
    sub = np.random.default_rng(seed + 1)
    out = infilling.layout_with_source(
        sample.tokens[:n],
        _part_b_order(spans, sub, o["shuffle_blocks"]),
        mask_id=mask_id,
        sop_id=ids.sop,
        eop_id=ids.eop,
        block_position=o["block_position"],
        eos_id=ids.eos,
    )
    return _row_from_layout(out, sample.head(n), "sentence")


def document_level(
    sample: Sample,
    G: int,
    rng: np.random.Generator,
    o,
    ids: SpecialIds,
    seq_len: int,
    stats: dict,
    mode: str = "document",
    infill_prob: float | None = None,
) -> dict:
    """[gMASK] generation of a suffix: the prefix layout, or (probability 1 - gpt_infill_prob, single
    documents only) one span of the same length placed inside the document. infill_prob=1 (the
    ChatGLM prefix LM) always takes the prefix layout, which adds one token instead of two."""
    sample = sample.head(min(len(sample), seq_len - (1 if infill_prob == 1.0 else 2)))
    n = len(sample)
    g = min(G, n - 2)
    if g < 1:
        stats["samples_without_spans"] = stats.get("samples_without_spans", 0) + 1
        out = infilling.layout_with_source(sample.tokens, [], mask_id=0, sop_id=0, eop_id=0)
        return _row_from_layout(out, sample, mode)
    gmask = ids.gmask if o["task_mask"] and ids.gmask is not None else ids.mask
    eos_at = np.flatnonzero(sample.tokens == ids.eos)
    multi = eos_at.size > 0 and eos_at[0] != n - 1
    p = o["gpt_infill_prob"] if infill_prob is None else infill_prob
    spans = None
    if not (multi or rng.random() < p):
        spans = place_spans(sample.tokens, [g], rng, eos_id=ids.eos, cls_id=ids.cls, ratio=o["bert_ratio"])
    if spans is None:
        out = infilling.prefix_layout(
            sample.tokens,
            n - g,
            gmask_id=gmask,
            sop_id=ids.sop,
            loss_mask=sample.loss_mask,
            block_position=o["block_position"],
        )
    else:
        out = infilling.layout_with_source(
            sample.tokens,
            spans,
            mask_id=gmask,
            sop_id=ids.sop,
            eop_id=ids.eop,
            block_position=o["block_position"],
            eos_id=ids.eos,
        )
    return _row_from_layout(out, sample, mode)


def causal(sample: Sample, seq_len: int, segment_ids: bool) -> dict:
    """Plain next-token LM on a packed row of seq_len + 1 tokens (positions restart per document
    when segment_ids is on, and the cross-document prediction gets no loss)."""
    s = sample.head(seq_len + 1)
    toks, seg = s.tokens[:-1], s.seg[:-1]
    loss = np.ones(len(toks), np.int32)
    if segment_ids:
        loss &= (s.seg[1:] == seg).astype(np.int32)
        first = np.concatenate([[0], np.flatnonzero(np.diff(seg)) + 1])
        pos = np.arange(len(toks)) - np.repeat(first, np.diff(np.concatenate([first, [len(toks)]])))
    else:
        pos = np.arange(len(toks))
    return {
        "tokens": toks.astype(np.int32),
        "targets": s.tokens[1:].astype(np.int32),
        "loss_mask": loss,
        "position_ids": pos.astype(np.int32),
        "block_position_ids": None,
        "sep": 0,
        "seg": seg,
        "mode": MODES.index("causal"),
    }


def split_short(
    sample: Sample, target_length: int, rng: np.random.Generator, ids: SpecialIds, is_end_V: np.ndarray
) -> Sample:
    """Reference `split_samples` for one sample: a window of target_length tokens snapped to sentence
    boundaries, re-prefixed with [CLS]. (The reference takes (seq_len-1)//target_length windows per
    sample and grows the batch; batches here have a fixed size, so one window per sample is kept.)"""
    has_cls = ids.cls is not None and len(sample) and sample.tokens[0] == ids.cls
    body = Sample(sample.tokens[1:], sample.loss_mask[1:], sample.seg[1:]) if has_cls else sample
    t = body.tokens
    if target_length < len(t):
        ends_V = is_end_V[np.minimum(t, len(is_end_V) - 1)] & (t < len(is_end_V))
        brk = ends_V | (t == ids.eos)
        start = int(rng.integers(0, len(t) - target_length))
        while start > 0 and (t[start] == ids.eos or not brk[start - 1]):
            start -= 1
        end = start + target_length
        while end > start and not brk[end - 1]:
            end -= 1
        if end - start < target_length // 2:
            end = start + target_length
        body = Sample(t[start:end], body.loss_mask[start:end], body.seg[start:end])
    if ids.cls is None:
        return body
    seg0 = body.seg[:1] if len(body) else np.ones(1, np.int32)
    return Sample(
        np.concatenate([[ids.cls], body.tokens]).astype(np.int32),
        np.concatenate([[0], body.loss_mask]).astype(np.int32),
        np.concatenate([seg0, body.seg]).astype(np.int32),
    )


def blank_infilling_rows(
    samples,
    batch_rng,
    sample_rngs,
    o,
    ids: SpecialIds,
    seq_len: int,
    is_end_V: np.ndarray,
    stats: dict,
    per_sample: bool = False,
) -> list[dict]:
    """Reference `construct_blocks`: r0 short-sequence split, r1 single span, r2 objective;
    the objective (and the document-level generation length) is drawn once per batch, or per sample."""

    def draws(rng):
        short = rng.random() < o["short_seq_prob"]
        lo = min(32, seq_len - 2)  # reference: randrange(32, seq_len - 1)
        target = int(rng.integers(lo, max(lo + 1, seq_len - 1))) if short else 0
        single = rng.random() < o["single_span_prob"]
        r2 = 0.0 if single else rng.random()
        mode = (
            "token"
            if r2 < o["bert_prob"]
            else ("sentence" if r2 < o["bert_prob"] + o["gap_sentence_prob"] else "document")
        )
        return target, single, mode

    if not per_sample:
        target, single, mode = draws(batch_rng)
        if target:
            samples = [split_short(s, target, r, ids, is_end_V) for s, r in zip(samples, sample_rngs)]
        G = None
        if mode == "document":
            G = generation_length([min(len(s), seq_len - 2) for s in samples], batch_rng, o["gpt_min_ratio"])
        plan = [(s, r, single, mode, G) for s, r in zip(samples, sample_rngs)]
    else:
        plan = []
        for s, r in zip(samples, sample_rngs):
            target, single, mode = draws(r)
            if target:
                s = split_short(s, target, r, ids, is_end_V)
            G = generation_length([min(len(s), seq_len - 2)], r, o["gpt_min_ratio"]) if mode == "document" else None
            plan.append((s, r, single, mode, G))
    rows = []
    for s, r, single, mode, G in plan:
        if mode == "token":
            rows.append(token_level(s, r, o, ids, seq_len, stats, single_span=single))
        elif mode == "sentence":
            rows.append(sentence_level(s, r, o, ids, seq_len, is_end_V, stats))
        else:
            rows.append(document_level(s, G, r, o, ids, seq_len, stats))
    return rows
