"""Packing documents into samples, after the reference `BlockDataset` (THUDM/GLM
data_utils/datasets.py).

A sample is `[CLS] doc <eos> [CLS] doc <eos> ...` of at most `max_len` tokens (no [CLS] for the
causal / ChatGLM objectives). Positions are not reset per document (reference behaviour).

Sampling unit: the valid documents are laid end to end as one character stream; unit u covers
characters [u*U, (u+1)*U) with U ~ the characters of one sample. Grain shuffles the units per epoch,
so every part of the corpus starts about one sample per epoch and long documents are drawn in
proportion to their length, as the reference's length-weighted document choice does.
For unit u the sample starts at a uniform character inside the unit. If that document fits in one
sample it is taken whole from its start; otherwise the cut moves to a sentence start (left or right
with probability 1/2, at most half a sample; reference rule). The sample is filled with the
following documents of the (TFDS-shuffled) store, each `[CLS] doc <eos>`, and a sample that ends
inside a document is right-stripped back to a sentence end unless that loses over half of it.
Only the text needed is tokenized (a window of about the sample's size), so huge documents cost
no more than small ones.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from glm_jax.data.objectives import Sample
from glm_jax.data.sources import DocSource, decode_doc

_SENT_END = re.compile(r"[.?!;:\n。？！；…]")


class DocStore:
    """Valid documents of a source, addressed by document index or by stream character offset."""

    def __init__(self, source: DocSource, chars_D: np.ndarray, max_doc_chars: int):
        self.source, self.chars_D, self.max_doc_chars = source, np.asarray(chars_D, np.int64), max_doc_chars
        self.end_D = np.cumsum(self.chars_D)
        self.total = int(self.end_D[-1]) if len(self.end_D) else 0
        self.valid_D = np.flatnonzero(self.chars_D > 0)

    def text(self, d: int) -> str | None:
        return decode_doc(self.source.raw(int(d)), self.max_doc_chars)[0]

    def locate(self, p: int) -> tuple[int, int]:
        d = int(np.searchsorted(self.end_D, p, side="right"))
        return d, int(p - (self.end_D[d] - self.chars_D[d]))

    def next_doc(self, d: int) -> int:
        j = int(np.searchsorted(self.valid_D, d, side="right"))
        return int(self.valid_D[j % len(self.valid_D)])


@dataclasses.dataclass(frozen=True)
class PackSpec:
    max_len: int  # tokens per sample, [CLS]s and <eos>s included
    eos_id: int
    cls_id: int | None
    unit_chars: int  # U: characters per sampling unit
    chars_per_token: float
    min_doc_tokens: int = 3
    right_strip: bool = True  # GLM: end a cut sample on a sentence end (reference); off for causal LM

    def num_units(self, store: DocStore) -> int:
        return max(1, -(-store.total // self.unit_chars))


def estimate_chars_per_token(store: DocStore, tok, probe_chars: int = 100_000) -> float:
    """Characters per token over the first ~probe_chars of the store (deterministic)."""
    chars, ids = 0, 0
    for d in store.valid_D[:1000]:
        t = (store.text(d) or "")[: probe_chars - chars]
        try:
            ids += len(tok.encode(t)) if t else 0
        except Exception:
            continue
        chars += len(t)
        if chars >= probe_chars:
            break
    return max(1.0, chars / max(ids, 1))


def _snap_start(text: str, off: int, rng: np.random.Generator, max_shift: int) -> int:
    """Moves a cut to a sentence start (just after . ? ! ; : or newline), then past whitespace."""
    if rng.random() < 0.5:
        lo = max(0, off - max_shift)
        ends = [m.end() for m in _SENT_END.finditer(text, lo, off)]
        q = ends[-1] if ends else None
    else:
        m = _SENT_END.search(text, max(0, off - 1), min(len(text), off + max_shift))
        q = m.end() if m else None
    if q is None:  # no sentence end in reach: at least start on a word
        m = re.compile(r"\s").search(text, off)
        q = m.end() if m else off
    while q < len(text) and text[q].isspace():
        q += 1
    return q if q < len(text) else 0


def _encode_from(tok, text: str, off: int, need: int, cpt: float) -> tuple[list[int], bool]:
    """Tokens of text[off:] up to at least `need` tokens, tokenizing a window cut at whitespace.
    Returns (ids, reached_end_of_text)."""
    width = int(need * cpt * 1.3) + 32
    while True:
        end = off + width
        if end >= len(text):
            return list(tok.encode(text[off:])), True
        cut = max(text.rfind(" ", off, end), text.rfind("\n", off, end))
        ids = list(tok.encode(text[off : cut if cut > off else end]))
        if len(ids) >= need:
            return ids, False
        width *= 2


def _right_strip(tokens: list[int], is_end_V: np.ndarray, keep_at_least: int) -> int:
    """Length after cutting back to the last sentence-end token, unless fewer than keep_at_least remain."""
    arr = np.asarray(tokens)
    ok = (arr < len(is_end_V)) & is_end_V[np.minimum(arr, len(is_end_V) - 1)]
    idx = np.flatnonzero(ok[keep_at_least - 1 :])
    return keep_at_least + int(idx[-1]) if idx.size else len(tokens)


def build_sample(
    store: DocStore, tok, unit: int, rng: np.random.Generator, spec: PackSpec, is_end_V: np.ndarray, stats: dict
) -> Sample:
    p = min(unit * spec.unit_chars + int(rng.integers(spec.unit_chars)), store.total - 1)
    d, off = store.locate(p)
    if store.chars_D[d] <= spec.unit_chars:
        off = 0  # a document that fits is taken whole, from its start
    tokens: list[int] = []
    seg: list[int] = []
    head = [spec.cls_id] if spec.cls_id is not None else []
    text = store.text(d)
    if text is not None and off:
        off = _snap_start(text, off, rng, spec.unit_chars // 2)
    cut, docno, last_start = False, 0, 0
    for _ in range(spec.max_len + 16):
        need = spec.max_len - len(tokens) - len(head)
        if need <= 0:
            cut = True
            break
        try:
            ids, at_end = _encode_from(tok, text, off, need, spec.chars_per_token) if text else ([], True)
            failed = False
        except Exception:
            stats["docs_skipped_encode_error"] = stats.get("docs_skipped_encode_error", 0) + 1
            ids, at_end, failed = [], True, True
        if failed:
            pass
        elif at_end and off == 0 and len(ids) < spec.min_doc_tokens:
            stats["docs_skipped_short"] = stats.get("docs_skipped_short", 0) + 1
        else:
            docno += 1
            last_start = len(tokens)
            complete = at_end and len(ids) < need
            piece = head + ids[:need] + ([spec.eos_id] if complete else [])
            tokens += piece
            seg += [docno] * len(piece)
            if not complete:
                cut = True
                break
        d = store.next_doc(d)
        text, off = store.text(d), 0
    if spec.right_strip and cut and len(tokens) >= spec.max_len:
        n = _right_strip(tokens, is_end_V, max(spec.max_len // 2, last_start + 1))
        tokens, seg = tokens[:n], seg[:n]
    tokens_N = np.asarray(tokens, np.int32)
    loss_N = np.ones(len(tokens), np.int32)
    if spec.cls_id is not None:
        loss_N[tokens_N == spec.cls_id] = 0
    return Sample(tokens_N, loss_N, np.asarray(seg, np.int32))
