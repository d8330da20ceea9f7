"""Batched, length-bucketed scoring and generation: the engine under the harness, perplexity and needle tools.

A request becomes one `Row`: input ids, positions, the bidirectional prefix length and, at every position,
the token it is scored on (-1: not scored). Two layouts:

    causal  (1-D position families: chatglm2, glm-hf, glm4)
            ids = (context + continuation)[:-1], positions 0..T-1, scored on the last len(continuation) tokens;
            left-truncated to `max_len` input tokens exactly as lm-eval's HFLM does.
    prefix  (2-D position families: glm, chatglm)
            GLM's own LM layout (`infilling.prefix_layout`): context [gMASK] <sop> continuation[:-1], the
            context and [gMASK] bidirectional, the continuation generated in Part B with block positions.

Rows are sorted by length, padded on the right to a bucket length from a fixed ladder (8, 12, 16, 24, 32, 48,
..., powers of two and 1.5x powers of two) and grouped into batches of a fixed size per bucket (the last batch
of a bucket is filled with dummy rows), so XLA compiles once per (bucket, batch size), not once per request.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from glm_jax import infilling


def bucket_length(n: int) -> int:
    """Smallest ladder length >= n: 8, 12, 16, 24, 32, 48, 64, 96, ... (2^k and 1.5 * 2^k)."""
    if n <= 8:
        return 8
    k = int(np.ceil(np.log2(n)))
    low = 3 * 2 ** (k - 2)  # 1.5 * 2^(k-1)
    return low if n <= low else 2**k


def scoring_mode(cfg) -> str:
    """'prefix' for the 2-D position families (GLM's Part A / Part B layout), else 'causal'."""
    return "prefix" if cfg.positions_2d else "causal"


@dataclasses.dataclass
class Row:
    ids: np.ndarray  # [T] int32
    pos: np.ndarray  # [T] or [2, T] int32
    prefix_len: int  # bidirectional prefix (0: causal)
    targets: np.ndarray  # [T] int32, the token position t is scored on; -1 = not scored

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def causal_row(context: Sequence[int], continuation: Sequence[int], max_len: int) -> Row:
    """HFLM's causal input: (context + continuation)[-(max_len + 1):][:-1], scored on the continuation."""
    if not continuation:
        raise ValueError("continuation is empty: there is nothing to score")
    if len(continuation) > max_len:
        raise ValueError(f"continuation of {len(continuation)} tokens is longer than max_len={max_len}")
    full = np.asarray(list(context) + list(continuation), np.int32)[-(max_len + 1) :]
    ids = full[:-1]
    targets = np.full(ids.shape, -1, np.int32)
    g = len(continuation)
    targets[-g:] = full[-g:]
    return Row(ids, np.arange(len(ids), dtype=np.int32), 0, targets)


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
    targets = np.where(out["loss_mask"] > 0, out["targets"], -1).astype(np.int32)
    pos = np.stack([out["position_ids"], out["block_position_ids"]]).astype(np.int32)
    return Row(out["tokens"].astype(np.int32), pos, int(out["sep"]), targets)


def make_row(cfg, context, continuation, max_len: int) -> Row:
    """causal_row or prefix_row, by the family's scoring mode; prefix rows need gmask and sop ids in cfg."""
    if scoring_mode(cfg) == "causal":
        return causal_row(context, continuation, max_len)
    if cfg.gmask_token_id is None or cfg.bos_token_id is None:
        raise ValueError(
            f"{cfg.family} checkpoint: config.json names no [gMASK] / <sop> ids, which GLM's LM scoring needs"
        )
    return prefix_row(context, continuation, max_len, gmask_id=cfg.gmask_token_id, sop_id=cfg.bos_token_id)


@functools.partial(jax.jit, static_argnames=("module",))
def token_logprobs(module, params, ids, mask, pos, prefix_len, targets):
    """Log-probability of `targets` at every position, and whether it is the argmax: ([B, T], [B, T])."""
    logits = module.apply({"params": params}, ids, mask, pos, prefix_len)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
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
        self.shapes: set[tuple[int, int]] = set()  # (batch, length) shapes run so far

    def batch_for(self, length: int) -> int:
        return max(1, min(self.batch_size, self.max_batch_tokens // length))

    def score(self, rows: Sequence[Row]) -> list[Score]:
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), i))
        out: list[Score | None] = [None] * len(rows)
        i = 0
        while i < len(order):
            T = bucket_length(len(rows[order[i]]))
            B = self.batch_for(T)
            group = [j for j in order[i : i + B] if bucket_length(len(rows[j])) == T]
            i += len(group)
            for j, sc in zip(group, self._run([rows[j] for j in group], B, T)):
                out[j] = sc
        return out  # type: ignore[return-value]

    def _run(self, batch: list[Row], B: int, T: int) -> list[Score]:
        two_d = batch[0].pos.ndim == 2
        ids = np.full((B, T), self.pad_id, np.int32)
        mask = np.zeros((B, T), np.int32)
        pos = np.zeros((B, 2, T) if two_d else (B, T), np.int32)
        prefix = np.zeros((B,), np.int32)
        targets = np.full((B, T), -1, np.int32)
        mask[:, 0] = 1  # dummy rows: one visible token, so no query sees only padding
        for b, r in enumerate(batch):
            n = len(r)
            ids[b, :n], mask[b, :n], pos[b, ..., :n] = r.ids, 1, r.pos
            prefix[b], targets[b, :n] = r.prefix_len, r.targets
        self.shapes.add((B, T))
        lp, greedy = token_logprobs(self.lm.module, self.lm.params, ids, mask, pos, prefix, targets)
        lp, greedy = np.asarray(lp), np.asarray(greedy)
        res = []
        for b in range(len(batch)):
            sel = targets[b] >= 0
            res.append(Score(float(lp[b][sel].sum(dtype=np.float64)), bool(greedy[b][sel].all()), lp[b][sel]))
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
