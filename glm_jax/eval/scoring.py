"""Batched, length-bucketed scoring and generation: the engine under the harness, perplexity and needle tools.

A request becomes a `Row` (input ids, positions, the bidirectional prefix length, and which logits are scored
on which tokens). Two layouts, by family:

    causal  (1-D position families: chatglm2, glm-hf, glm4)
            ids = (context + continuation)[:-1], positions 0..T-1, scored on the last len(continuation) tokens;
            left-truncated to `max_len` input tokens exactly as lm-eval's HFLM does.
    prefix  (2-D position families: glm, chatglm)
            GLM's own LM layout (`infilling.prefix_layout`): context [gMASK] <sop> continuation[:-1], the
            context and [gMASK] bidirectional, the continuation generated in Part B with block positions.

Requests that share a context (the choices of a multiple-choice question) can share one `packed_row`: the
context once, each continuation a segment of its own under a dense mask, same positions, same numbers.

Rows are sorted by length, padded on the right to a bucket length from a fixed ladder (`bucket_length`) and
grouped into batches of a fixed size per bucket (the last batch of a bucket is filled with dummy rows), so XLA
compiles once per (bucket, batch size, scored-length bucket), not once per request. Only the scored positions
go through the output projection and the softmax: the model's final hidden states are gathered there first,
which saves the [B, T, V] logits of the context.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from glm_jax import infilling
from glm_jax.inputs import position_limit
from glm_jax.model.layers import dtype_of, matmul


def bucket_length(n: int) -> int:
    """Smallest ladder length >= n: 8, 12, 16, 24, 32, 48, 64, then 2^k x (1, 1.25, 1.5, 1.75): 80, 96, 112,
    128, 160, ... (at most 25% padding above 64 tokens, a handful of shapes per doubling)."""
    if n <= 8:
        return 8
    if n <= 64:
        k = int(np.ceil(np.log2(n)))
        low = 3 * 2 ** (k - 2)  # 1.5 * 2^(k-1)
        return low if n <= low else 2**k
    k = int(np.floor(np.log2(n - 1)))
    step = 2 ** (k - 2)
    return int(-(-n // step) * step)


def model_length(cfg, default: int) -> int:
    """A tool's default length on this model: `default`, or the model's learned positions when it has fewer."""
    limit = position_limit(cfg)
    return default if limit is None else min(default, limit)


def check_length(cfg, n: int, what: str) -> None:
    """ValueError when `what` = n tokens is past the model's learned positions: the position table has no rows
    there, and the model's logits would be NaN (rotary families have no such table)."""
    limit = position_limit(cfg)
    if limit is not None and n > limit:
        raise ValueError(
            f"{what}={n} is more than the model's {limit} learned positions (max_position_embeddings); "
            f"give {what} up to {limit}"
        )


def scoring_mode(cfg) -> str:
    """'prefix' for the 2-D position families (GLM's Part A / Part B layout), else 'causal'."""
    return "prefix" if cfg.positions_2d else "causal"


@dataclasses.dataclass
class Row:
    """One model input: ids, positions, the bidirectional prefix length, and the requests it answers: `picks`,
    one (positions, target ids) pair per request: the logits at positions[j] are scored on targets[j].
    seg (packed rows only): segment id per token, 0 = the shared context, i = the i-th continuation, which
    attends to the context and to itself only."""

    ids: np.ndarray  # [T] int32
    pos: np.ndarray  # [T] or [2, T] int32
    prefix_len: int  # bidirectional prefix (0: causal)
    picks: list  # [(positions [g] int32, targets [g] int32), ...]
    seg: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def _i32(x) -> np.ndarray:
    return np.asarray(x, np.int32)


def causal_row(context: Sequence[int], continuation: Sequence[int], max_len: int) -> Row:
    """HFLM's causal input: (context + continuation)[-(max_len + 1):][:-1], scored on the continuation."""
    g = len(continuation)
    if not g:
        raise ValueError("continuation is empty: there is nothing to score")
    if g > max_len:
        raise ValueError(f"continuation of {g} tokens is longer than max_len={max_len}")
    full = _i32(list(context) + list(continuation))[-(max_len + 1) :]
    n = len(full) - 1
    return Row(full[:-1], np.arange(n, dtype=np.int32), 0, [(np.arange(n - g, n, dtype=np.int32), full[-g:])])


def prefix_row(context: Sequence[int], continuation: Sequence[int], max_len: int, *, gmask_id: int, sop_id: int) -> Row:
    """GLM's LM layout: context [gMASK] | <sop> continuation[:-1]; the context is left-truncated to fit max_len."""
    g = len(continuation)
    if not g:
        raise ValueError("continuation is empty: there is nothing to score")
    room = max_len - g - 1  # input length = len(context) + 1 + g
    if room < 1 or not context:
        raise ValueError(f"context + continuation ({len(context)} + {g} tokens) do not fit max_len={max_len}")
    ctx = list(context)[-room:]
    out = infilling.prefix_layout(ctx + list(continuation), len(ctx), gmask_id=gmask_id, sop_id=sop_id)
    at = np.flatnonzero(out["loss_mask"]).astype(np.int32)
    pos = np.stack([out["position_ids"], out["block_position_ids"]]).astype(np.int32)
    return Row(_i32(out["tokens"]), pos, int(out["sep"]), [(at, _i32(out["targets"])[at])])


def _cue(cfg) -> tuple[int, int]:
    if cfg.gmask_token_id is None or cfg.bos_token_id is None:
        raise ValueError(
            f"{cfg.family} checkpoint: config.json names no [gMASK] / <sop> ids, which GLM's LM scoring needs"
        )
    return cfg.gmask_token_id, cfg.bos_token_id


def make_row(cfg, context, continuation, max_len: int) -> Row:
    """causal_row or prefix_row, by the family's scoring mode; prefix rows need gmask and sop ids in cfg."""
    if scoring_mode(cfg) == "causal":
        return causal_row(context, continuation, max_len)
    gmask, sop = _cue(cfg)
    return prefix_row(context, continuation, max_len, gmask_id=gmask, sop_id=sop)


def packed_row(cfg, context: Sequence[int], continuations: Sequence[Sequence[int]], max_len: int) -> Row | None:
    """One row for several continuations of one context (a multiple-choice question): the context once, then
    each continuation as its own segment that sees the context and itself, with the positions it would have
    alone. causal: ctx | c1[:-1] | c2[:-1] ..., c_i[0] scored at the last context token; prefix: ctx [gMASK] |
    <sop> c1[:-1] | <sop> c2[:-1] ... (GLM's layout of several candidates). None when it does not fit max_len
    (or there is no context): score the requests one row each instead."""
    ctx, conts = list(context), [list(c) for c in continuations]
    if not ctx or not all(conts):
        return None
    prefix = scoring_mode(cfg) == "prefix"
    head = ctx + list(_cue(cfg)[:1]) if prefix else ctx
    c = len(head)
    ids, pos, block, seg, picks = list(head), list(range(c)), [0] * c, [0] * c, []
    for i, cont in enumerate(conts, 1):
        body = ([_cue(cfg)[1]] + cont[:-1]) if prefix else cont[:-1]
        start = len(ids)
        ids += body
        seg += [i] * len(body)
        if prefix:  # at the [gMASK] position, block positions 1..
            pos += [c - 1] * len(body)
            block += list(range(1, len(body) + 1))
            at = list(range(start, start + len(body)))
        else:
            pos += list(range(c, c + len(body)))
            at = [c - 1] + list(range(start, start + len(body)))
        picks.append((_i32(at), _i32(cont)))
    if len(ids) > max_len:
        return None
    p = np.stack([_i32(pos), _i32(block)]) if prefix else _i32(pos)
    return Row(_i32(ids), p, c if prefix else 0, picks, _i32(seg))


def _project(module, x):
    """GLMModel's output projection of final hidden states x [..., D]: lm_head, or the tied embedding."""
    c = module.cfg
    if c.tie_word_embeddings:
        return matmul(x, module.embed.embedding.astype(dtype_of(c.dtype)), transpose_w=True)
    return module.lm_head(x)


@functools.partial(jax.jit, static_argnames=("module",))
def token_logprobs(module, params, ids, mask, pos, prefix_len, sel, targets):
    """Log-probability of `targets` [B, K] at positions `sel` [B, K] of the rows, and whether it is the argmax:
    ([B, K], [B, K]). The logits of the other positions are never computed (XLA drops them)."""
    _, hidden = module.apply({"params": params}, ids, mask, pos, prefix_len, method="with_hidden")
    h = jnp.take_along_axis(hidden.final, sel[..., None], axis=1)
    logits = module.apply({"params": params}, h, method=_project).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    tgt = jnp.maximum(targets, 0)
    lp = jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    return lp, jnp.argmax(logp, axis=-1) == tgt


@dataclasses.dataclass
class Score:
    logprob: float  # sum over the scored tokens
    greedy: bool  # every scored token is the argmax
    token_logprobs: np.ndarray  # per scored token


class Scorer:
    """Scores Rows in fixed-shape batches. batch_size: rows per batch; max_batch_tokens caps batch x length for
    long buckets (the batch size of a bucket is then the largest that fits, at least 1)."""

    def __init__(self, lm, batch_size: int = 8, max_batch_tokens: int = 16384, pad_id: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lm = lm
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.pad_id = int(pad_id if pad_id is not None else (lm.config.pad_token_id or 0))
        self.shapes: set[tuple[int, int, int]] = set()  # (batch, length, scored length) shapes run so far
        self.rows = self.packed_rows = 0  # rows scored so far, and how many of them were packed

    def batch_for(self, length: int) -> int:
        return max(1, min(self.batch_size, self.max_batch_tokens // length))

    def score(self, rows: Sequence[Row]) -> list[list[Score]]:
        """Scores per row, one per pick (request) of the row."""
        limit = position_limit(self.lm.config)
        if limit is not None and rows and (top := max(int(r.pos.max(initial=0)) for r in rows)) >= limit:
            raise ValueError(f"a row reaches position {top}, past the model's {limit} learned positions")
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), i))
        out: list[list[Score] | None] = [None] * len(rows)
        i = 0
        while i < len(order):
            T = bucket_length(len(rows[order[i]]))
            B = self.batch_for(T)
            group = [j for j in order[i : i + B] if bucket_length(len(rows[j])) == T]
            i += len(group)
            for j, sc in zip(group, self._run([rows[j] for j in group], B, T)):
                out[j] = sc
        return out  # type: ignore[return-value]

    def _run(self, batch: list[Row], B: int, T: int) -> list[list[Score]]:
        two_d = batch[0].pos.ndim == 2
        ids = np.full((B, T), self.pad_id, np.int32)
        valid = np.zeros((B, T), bool)
        seg = np.zeros((B, T), np.int32)
        pos = np.zeros((B, 2, T) if two_d else (B, T), np.int32)
        prefix = np.zeros((B,), np.int32)
        valid[:, 0] = True  # dummy rows: one visible token, so no query sees only padding
        K = min(T, bucket_length(max(sum(len(a) for a, _ in r.picks) for r in batch)))
        sel = np.zeros((B, K), np.int32)
        targets = np.full((B, K), -1, np.int32)
        for b, r in enumerate(batch):
            n = len(r)
            ids[b, :n], valid[b, :n], pos[b, ..., :n], prefix[b] = r.ids, True, r.pos, r.prefix_len
            if r.seg is not None:
                seg[b, :n] = r.seg
            at = np.concatenate([a for a, _ in r.picks])
            sel[b, : len(at)] = at
            targets[b, : len(at)] = np.concatenate([t for _, t in r.picks])
        if seg.any():  # packed rows: a dense mask keeps the continuations apart
            q, k = np.arange(T)[:, None], np.arange(T)[None, :]
            same = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
            mask = valid[:, None, :] & ((k < prefix[:, None, None]) | ((k <= q)[None] & same))
        else:
            mask = valid.astype(np.int32)
        self.shapes.add((B, T, K))
        self.rows += len(batch)
        self.packed_rows += sum(r.seg is not None for r in batch)
        lp, greedy = token_logprobs(self.lm.module, self.lm.params, ids, mask, pos, prefix, sel, targets)
        lp, greedy = np.asarray(lp), np.asarray(greedy)
        res = []
        for b, r in enumerate(batch):
            row, off = [], 0
            for a, _ in r.picks:
                x, ok = lp[b, off : off + len(a)], greedy[b, off : off + len(a)]
                row.append(Score(float(x.sum(dtype=np.float64)), bool(ok.all()), x))
                off += len(a)
            res.append(row)
        return res


def generate_rows(
    lm,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    eos_ids: Sequence[int],
    pad_id: int,
    batch_size: int = 8,
    done_fn: Callable[[list[int]], bool] | None = None,
    first_chunk: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[list[int]]:
    """New tokens for each prompt (up to, not including, the first eos), `lm.generate` in fixed-shape batches.

    Prompts are left-padded to a bucket length; generation runs in chunks of 16, 32, 64, ... tokens, and stops
    early once every row of the batch has an eos or `done_fn(new_tokens)` (e.g. a stop string) is true.
    Each further chunk re-reads the prompt plus the tokens so far (one prefill) — greedy results are those of
    one uninterrupted run."""
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    out: list[list[int]] = [[] for _ in prompts]
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        news = _generate_batch(
            lm,
            [list(prompts[i]) for i in idx],
            max_new_tokens,
            list(eos_ids),
            pad_id,
            batch_size,
            done_fn,
            first_chunk,
            dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p),
            seed + s,
        )
        for i, new in zip(idx, news):
            out[i] = new
    return out


def _generate_batch(lm, prompts, max_new, eos, pad_id, B, done_fn, first_chunk, sampling, seed):
    rows = prompts + [prompts[0]] * (B - len(prompts))  # dummy rows repeat the first prompt
    new: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    made, chunk, step = 0, max(1, first_chunk), 0
    while made < max_new and not all(done[: len(prompts)]):
        n = min(chunk, max_new - made)
        seqs = [r + t for r, t in zip(rows, new)]
        T = bucket_length(max(len(x) for x in seqs))
        ids = np.full((B, T), pad_id, np.int32)
        mask = np.zeros((B, T), np.int32)
        for b, x in enumerate(seqs):
            ids[b, T - len(x) :], mask[b, T - len(x) :] = x, 1
        res = lm.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=n,
            eos_token_id=eos or [-1],
            pad_token_id=pad_id,
            seed=seed + step,
            **sampling,
        )
        gen = np.asarray(res)[:, T:]
        for b in range(len(rows)):
            if done[b]:
                continue
            for t in gen[b].tolist():
                if t in eos:
                    done[b] = True
                    break
                new[b].append(int(t))
            if not done[b] and done_fn is not None and done_fn(new[b]):
                done[b] = True
        made += n
        chunk *= 2
        step += 1
    return new[: len(prompts)]
