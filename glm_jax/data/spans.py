"""Where GLM's blanks go (THUDM/GLM blocklm_utils.py): span lengths drawn from a Poisson CDF, their places
inside the packed documents of a sample, sentence boundaries for gap-sentence blanks, and the per-batch
generation length. Every function takes an explicit `np.random.Generator`; nothing reads global random state."""

from __future__ import annotations

import math

import numpy as np


def span_length_cdf(avg_block_length: float = 3.0, max_block_length: int = 40) -> np.ndarray:
    """CDF over lengths 1..max_block_length-1 with weights Poisson(k; lambda) (zero excluded)."""
    k = np.arange(1, max_block_length)
    pmf = np.exp(k * math.log(avg_block_length) - avg_block_length - np.array([math.lgamma(x + 1) for x in k]))
    return np.cumsum(pmf / pmf.sum())


def draw_lengths(rng: np.random.Generator, cdf: np.ndarray, budget: int) -> np.ndarray:
    """Span lengths drawn one after another until their sum reaches `budget` (reference: >= 15 %)."""
    if budget <= 0:
        return np.zeros(0, np.int64)
    mean = float(np.sum(np.diff(np.concatenate([[0.0], cdf])) * np.arange(1, len(cdf) + 1)))
    out = np.zeros(0, np.int64)
    while out.sum() < budget:
        k = int((budget - out.sum()) / mean * 1.2) + 4
        out = np.concatenate([out, np.searchsorted(cdf, rng.random(k), side="right") + 1])
    return out[: int(np.searchsorted(np.cumsum(out), budget, side="left")) + 1]


def document_regions(tokens_N: np.ndarray, eos_id: int, cls_id: int | None) -> list[tuple[int, int]]:
    """Maskable (offset, length) regions, one per packed document, sorted by length (reference order).

    A region starts after an <eos> (or at 0), skips a following [CLS], ends before the next <eos>; the
    segment after the last <eos> is empty, and a sample not ending in <eos> loses its final token.
    """
    n = len(tokens_N)
    indices = [-1] + np.flatnonzero(tokens_N == eos_id).tolist()
    last, docs = n, []
    for index in reversed(indices):
        start = index
        if cls_id is not None and start + 1 < n and tokens_N[start + 1] == cls_id:
            start += 1
        length = last - start - 1
        if last == n and length > 0:
            length -= 1
        docs.append((start + 1, length))
        last = index
    docs.sort(key=lambda d: d[1])
    return docs


def _spans_in_region(lengths, region_len: int, offset: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    lengths = np.asarray(lengths, np.int64)
    free = region_len - int(lengths.sum())
    places = np.sort(rng.integers(0, free - len(lengths) + 2, size=len(lengths)))
    starts = offset + places + np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
    return list(zip(starts.tolist(), (starts + lengths).tolist()))


def place_spans(
    tokens_N: np.ndarray, lengths, rng: np.random.Generator, *, eos_id: int, cls_id: int | None, ratio: float = 0.15
) -> list[tuple[int, int]] | None:
    """Reference `sample_span_in_document`: spans (in list order) for shuffled `lengths`, or None
    when not all fit (the reference then drops the sample). Shorter documents take consecutive
    lengths up to int(ratio * len) each; the longest takes the rest while sum + gaps <= its length;
    >= 1 unmasked token between spans; [CLS] and <eos> are never masked."""
    lengths = list(np.asarray(lengths)[rng.permutation(len(lengths))])
    spans, cursor = [], 0
    docs = document_regions(tokens_N, eos_id, cls_id)
    for i, (offset, length) in enumerate(docs):
        total, count = 0, 0
        last = i == len(docs) - 1
        budget = int(length * ratio)
        while cursor + count < len(lengths):
            nxt = lengths[cursor + count]
            if (last and nxt + total + count > length) or (not last and nxt + total > budget):
                break
            total, count = total + nxt, count + 1
        if count:
            spans += _spans_in_region(lengths[cursor : cursor + count], length, offset, rng)
            cursor += count
    return spans if len(spans) == len(lengths) else None


def sentence_spans(
    tokens_N: np.ndarray, is_end_V: np.ndarray, *, eos_id: int, cls_id: int | None
) -> list[tuple[int, int]]:
    """Reference sentence segmentation: a sentence ends at a token containing . ? ! ; :
    (and CJK forms, newline); text after a document's last sentence end is not a sentence."""
    n = len(tokens_N)
    safe = np.minimum(tokens_N, len(is_end_V) - 1)
    is_end = is_end_V[safe] & (tokens_N < len(is_end_V)) & (tokens_N != eos_id)
    is_eos = tokens_N == eos_id
    c0 = 1 if cls_id is not None and n and tokens_N[0] == cls_id else 0
    b = np.flatnonzero(is_end | is_eos)
    starts = np.concatenate([[c0], b[:-1] + 1]).astype(np.int64) if b.size else np.zeros(0, np.int64)
    starts = np.maximum(starts, c0)
    ends = b + 1
    keep = is_end[b] & (starts < ends)
    out = list(zip(starts[keep].tolist(), ends[keep].tolist()))
    c = int(b[-1] + 1) if b.size else c0
    c = max(c, c0)
    if c < n:
        out.append((c, n))
    return out


def choose_sentences(sentences, n: int, rng: np.random.Generator, ratio: float) -> list[tuple[int, int]]:
    """Shuffle the sentences; take them until their total length reaches int(ratio * n)."""
    chosen, total, target = [], 0, int(ratio * n)
    for j in rng.permutation(len(sentences)):
        s, e = sentences[j]
        chosen.append((s, e))
        total += e - s
        if total >= target:
            break
    return chosen


def generation_length(sample_lens, rng: np.random.Generator, min_ratio: float) -> int:
    """One generation length per batch: G ~ U{int(min_ratio * min_len) .. max_len - 2}."""
    lo, hi = int(min_ratio * min(sample_lens)), max(sample_lens) - 2
    return int(rng.integers(lo, max(lo, hi) + 1))
