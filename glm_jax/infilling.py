"""GLM autoregressive blank infilling: the pure layout functions.

This is the reference `ConstructBlockStrategy.make_block_data` layout (THUDM/GLM `blocklm_utils.py`)
and the document-level "prefix" layout of the same file, as pure numpy
functions of (tokens, spans). No sentinel tokens, no [dBLOCK] corruption, no context masking.
The samplers that choose the spans live in `glm_jax.data.objectives`.

Layout of one sample (spans in Part B order, `[S]` = sop, `[E]` = eop, `[M]` = the mask token):

    Part A = text with every span replaced by one [M]      positions 0..sep-1, block positions 0
    Part B = for each span: [S] + span                     positions = Part A index of its [M],
                                                           block positions 1..len+1
    targets = Part A tokens (loss 0) ++ for each span: span + [E] (loss 1)   -- already shifted

Attention rule for the model: query q may attend key k iff k < sep or k <= q.
Legend for array names: N input length, S spans, T output length.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["layout", "prefix_layout", "layout_with_source"]


def _as_tokens(tokens) -> np.ndarray:
    tokens_N = np.asarray(tokens)
    if tokens_N.ndim != 1:
        raise ValueError(f"tokens must be a 1-D sequence, got shape {tokens_N.shape}")
    if tokens_N.size and not np.issubdtype(tokens_N.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got dtype {tokens_N.dtype}")
    return tokens_N.astype(np.int64, copy=False)


def _as_spans(spans, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Validates half-open spans against a length-n sequence; returns (starts_S, ends_S) in the given order."""
    spans_S2 = np.asarray(list(spans) if not isinstance(spans, np.ndarray) else spans)
    if spans_S2.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if spans_S2.ndim != 2 or spans_S2.shape[1] != 2 or not np.issubdtype(spans_S2.dtype, np.integer):
        raise ValueError(f"spans must be a list of integer (start, end) pairs, got {spans!r}")
    starts_S, ends_S = spans_S2[:, 0].astype(np.int64), spans_S2[:, 1].astype(np.int64)
    bad = (starts_S < 0) | (ends_S > n) | (ends_S <= starts_S)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"span {j} = [{starts_S[j]}, {ends_S[j]}) is empty or out of range for {n} tokens; "
            "spans are half-open [start, end) with 0 <= start < end <= len(tokens)"
        )
    order = np.argsort(starts_S, kind="stable")
    s_sorted, e_sorted = starts_S[order], ends_S[order]
    overlap = s_sorted[1:] < e_sorted[:-1]
    if overlap.any():
        j = int(np.flatnonzero(overlap)[0])
        raise ValueError(f"spans [{s_sorted[j]}, {e_sorted[j]}) and [{s_sorted[j + 1]}, {e_sorted[j + 1]}) overlap")
    return starts_S, ends_S


def layout_with_source(
    tokens, spans, *, mask_id: int, sop_id: int, eop_id: int, block_position: bool = True, eos_id: int | None = None
) -> dict:
    """`layout` plus `source_index` [T]: the input index each output token comes from.

    Part A tokens map to themselves (a mask placeholder maps to its span start); Part B tokens map
    to the span token they copy, and a sop maps to its span start. Used to carry per-token
    attributes (document/segment ids) through the layout.
    """
    tokens_N = _as_tokens(tokens)
    n = tokens_N.shape[0]
    starts_S, ends_S = _as_spans(spans, n)
    lens_S = ends_S - starts_S

    # interior_N: inside a span but not its first token (these vanish from Part A).
    delta = np.zeros(n + 1, np.int64)
    np.add.at(delta, starts_S + 1, 1)
    np.add.at(delta, ends_S, -1)
    interior_N = np.cumsum(delta[:n]) > 0
    if eos_id is not None and starts_S.size:
        in_span_N = interior_N.copy()
        in_span_N[starts_S] = True
        if np.any(tokens_N[in_span_N] == eos_id):
            raise ValueError("a span contains the end-of-document token; spans must stay inside documents")
    keep_N = ~interior_N
    pos_N = np.cumsum(keep_N) - 1  # Part A index of every input token
    sep = int(keep_N.sum())

    src_a = np.flatnonzero(keep_N)
    tokens_a = tokens_N[src_a].copy()
    tokens_a[pos_N[starts_S]] = mask_id

    # Part B, vectorised over spans in the given order: block j has lens[j] + 1 slots.
    width_S = lens_S + 1
    total = int(width_S.sum())
    block_begin_S = np.cumsum(width_S) - width_S
    off_B = np.arange(total) - np.repeat(block_begin_S, width_S)  # 0 .. len within each block
    start_B = np.repeat(starts_S, width_S)
    len_B = np.repeat(lens_S, width_S)
    src_in_B = start_B + np.maximum(off_B - 1, 0)  # sop -> span start
    tokens_b = np.where(off_B == 0, sop_id, tokens_N[src_in_B])
    tgt_src_B = np.minimum(start_B + off_B, n - 1)
    targets_b = np.where(off_B == len_B, eop_id, tokens_N[tgt_src_B])
    pos_b = np.repeat(pos_N[starts_S], width_S)
    block_b = off_B + 1 if block_position else np.ones(total, np.int64)

    i32 = np.int32
    return {
        "tokens": np.concatenate([tokens_a, tokens_b]).astype(i32),
        "targets": np.concatenate([tokens_a, targets_b]).astype(i32),
        "loss_mask": np.concatenate([np.zeros(sep, i32), np.ones(total, i32)]),
        "position_ids": np.concatenate([np.arange(sep), pos_b]).astype(i32),
        "block_position_ids": np.concatenate([np.zeros(sep, np.int64), block_b]).astype(i32),
        "sep": sep,
        "source_index": np.concatenate([src_a, src_in_B]).astype(i32),
    }


def layout(
    tokens: Sequence[int],
    spans: Sequence[tuple[int, int]],
    *,
    mask_id: int,
    sop_id: int,
    eop_id: int,
    block_position: bool = True,
    eos_id: int | None = None,
) -> Mapping:
    """GLM blank-infilling layout of one sample (THUDM/GLM `make_block_data`).

    tokens: 1-D ints, length N. spans: [(start, end), ...] half-open, in Part B order (the order in
    which they are generated); in Part A each span becomes one `mask_id`.
    block_position=False gives every Part B token block position 1 (`--no-block-position`).
    eos_id (optional): reject spans that contain it, as the reference does.

    Returns {tokens, targets, loss_mask, position_ids, block_position_ids: int32 [T], sep: int} with
    T = N + 2 * len(spans) and sep the Part A length. Targets are already shifted (the output at t
    is trained to predict targets[t]); loss_mask is 1 exactly on Part B.
    Raises ValueError for empty, out-of-range or overlapping spans.
    """
    out = layout_with_source(
        tokens, spans, mask_id=mask_id, sop_id=sop_id, eop_id=eop_id, block_position=block_position, eos_id=eos_id
    )
    del out["source_index"]
    return out


def prefix_layout(
    tokens: Sequence[int],
    k: int,
    *,
    gmask_id: int,
    sop_id: int,
    loss_mask: Sequence[int] | None = None,
    block_position: bool = True,
) -> dict:
    """Document-level "prefix" (division) layout of THUDM/GLM; also ChatGLM's `[gMASK] <sop>` prefix LM.

    source = tokens[:k], target = tokens[k:] (g = N - k tokens):
      tokens  = source ++ [gMASK] ++ [sop] ++ target[:-1]     (length N + 1)
      targets = source ++ [gMASK] ++ target                   (no eop; the last target is tokens[-1])
      loss    = 0 * (k + 1) ++ loss_mask[k:]                  (loss_mask defaults to all ones)
      positions = 0..k, then k repeated g times; block positions 0 * (k + 1), then 1..g
      sep = k + 1 (the [gMASK] belongs to the bidirectional prefix).
    block_position=False gives block positions 1 on the generated part (the reference's variant of
    this branch builds a channel one element too long; this is the evident intent).
    Also returns source_index [N + 1] ([gMASK] -> k - 1, sop -> k) for carrying segment ids.
    """
    tokens_N = _as_tokens(tokens)
    n = tokens_N.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"prefix length k={k} must satisfy 1 <= k < len(tokens) = {n}")
    g = n - k
    lm_N = np.ones(n, np.int32) if loss_mask is None else np.asarray(loss_mask, np.int32)
    if lm_N.shape != (n,):
        raise ValueError(f"loss_mask must have shape ({n},), got {lm_N.shape}")
    i32 = np.int32
    return {
        "tokens": np.concatenate([tokens_N[:k], [gmask_id, sop_id], tokens_N[k:-1]]).astype(i32),
        "targets": np.concatenate([tokens_N[:k], [gmask_id], tokens_N[k:]]).astype(i32),
        "loss_mask": np.concatenate([np.zeros(k + 1, i32), lm_N[k:]]).astype(i32),
        "position_ids": np.concatenate([np.arange(k + 1), np.full(g, k)]).astype(i32),
        "block_position_ids": np.concatenate(
            [np.zeros(k + 1), np.arange(1, g + 1) if block_position else np.ones(g)]
        ).astype(i32),
        "sep": k + 1,
        "source_index": np.concatenate([np.arange(k), [k - 1, k], np.arange(k, n - 1)]).astype(i32),
    }
