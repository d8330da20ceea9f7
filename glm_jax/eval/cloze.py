"""GLM cloze scoring of multi-token answer candidates, as GLM's NLU finetuning and evaluation score them.

THUDM/GLM (`tasks/superglue/pvp.py` with multi-token answers, `tasks/data_utils.build_decoder_input`,
`model/downstream.GLMForMultiTokenCloze`): the question with one [MASK] blank is Part A (bidirectional);
each candidate is generated in Part B after <sop>, at the mask's position with block positions 1, 2, ...;
the candidate's ids get an <eop> appended, so the scored targets are candidate + <eop>. Here the layout is
`glm_jax.infilling.layout(left + candidate + right, [(len(left), len(left) + len(candidate))])`, which is
exactly that. score = sum of the target log-probs (include_eop=False drops the <eop> term), divided by
(number of targets) ** length_penalty when length_penalty > 0, as GLMForMultiTokenCloze does.

`cloze_loss` is the classification objective over verbaliser candidates: cross entropy of the softmax over
the candidates' scores, differentiable in the params (jax.grad), for finetuning code.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from glm_jax import infilling
from glm_jax.eval.scoring import bucket_length

Example = tuple[Sequence[int], Sequence[Sequence[int]], Sequence[int]]  # (left ids, candidates, right ids)
_EOP_NAMES = ("<|endofpiece|>", "<eop>", "eop")


def special_ids(cfg, tok=None, mask_id=None, sop_id=None, eop_id=None) -> tuple[int, int, int]:
    """(mask, sop, eop) ids: the arguments where given, else config.json's [MASK] and <sop>, and the tokenizer's
    <eop> (or config.json's first eos id, which is <eop> for the original GLM)."""
    mask_id = cfg.mask_token_id if mask_id is None else mask_id
    sop_id = cfg.bos_token_id if sop_id is None else sop_id
    if eop_id is None and tok is not None:
        for name in _EOP_NAMES:
            try:
                eop_id = tok.token_to_id(name)
                break
            except (ValueError, AttributeError):
                continue
    if eop_id is None and cfg.eos_token_id:
        eop_id = cfg.eos_token_id[0]
    missing = [n for n, v in (("mask", mask_id), ("sop", sop_id), ("eop", eop_id)) if v is None]
    if missing:
        raise ValueError(f"cloze scoring needs the {', '.join(missing)} token id(s); pass them explicitly")
    return int(mask_id), int(sop_id), int(eop_id)


def cloze_batch(
    examples: Sequence[Example],
    *,
    mask_id: int,
    sop_id: int,
    eop_id: int,
    pad_id: int = 0,
    include_eop: bool = True,
    block_position: bool = True,
    length: int | None = None,
    num_choices: int | None = None,
) -> dict[str, np.ndarray]:
    """Inputs for N examples of up to C candidates, each candidate one blank-infilling layout row of length T
    (right-padded; T = `length` or the bucket length of the longest row):

    tokens, attention_mask, targets, score_mask [N, C, T]; position_ids [N, C, 2, T]; prefix_len [N, C] (the
    Part A length, GLM's sep); choice_mask [N, C] (False for the padding candidates of shorter lists)."""
    if not examples:
        raise ValueError("no examples to score")
    layouts = []
    for e, (left, cands, right) in enumerate(examples):
        if not cands:
            raise ValueError(f"example {e}: no candidates")
        rows = []
        for c, cand in enumerate(cands):
            if len(cand) == 0:
                raise ValueError(f"example {e}: candidate {c} has no tokens")
            tokens = list(left) + list(cand) + list(right)
            spans = [(len(left), len(left) + len(cand))]
            rows.append(infilling.layout(tokens, spans, mask_id=mask_id, sop_id=sop_id, eop_id=eop_id,
                                         block_position=block_position))  # fmt: skip
        layouts.append(rows)
    N = len(examples)
    C = num_choices or max(len(r) for r in layouts)
    longest = max(len(x["tokens"]) for r in layouts for x in r)
    T = length or bucket_length(longest)
    if longest > T or max(len(r) for r in layouts) > C:
        raise ValueError(f"length={T} / num_choices={C} is too small for rows of {longest} tokens")
    out = {
        "tokens": np.full((N, C, T), pad_id, np.int32),
        "attention_mask": np.zeros((N, C, T), np.int32),
        "position_ids": np.zeros((N, C, 2, T), np.int32),
        "prefix_len": np.zeros((N, C), np.int32),
        "targets": np.zeros((N, C, T), np.int32),
        "score_mask": np.zeros((N, C, T), np.float32),
        "choice_mask": np.zeros((N, C), bool),
    }
    out["attention_mask"][..., 0] = 1  # padding candidates: one visible token
    for n, rows in enumerate(layouts):
        for c, x in enumerate(rows):
            L = len(x["tokens"])
            score = x["loss_mask"].astype(np.float32)
            if not include_eop:
                score[L - 1] = 0.0  # the last target of the (single) span is its <eop>
            out["tokens"][n, c, :L] = x["tokens"]
            out["attention_mask"][n, c, :L] = 1
            out["position_ids"][n, c, 0, :L] = x["position_ids"]
            out["position_ids"][n, c, 1, :L] = x["block_position_ids"]
            out["prefix_len"][n, c] = x["sep"]
            out["targets"][n, c, :L] = x["targets"]
            out["score_mask"][n, c, :L] = score
            out["choice_mask"][n, c] = True
    return out


def candidate_scores(module, params, batch: dict, length_penalty: float = 0.0):
    """Scores [N, C] (float32, differentiable in params): the summed target log-probs of each candidate,
    divided by its target count ** length_penalty when length_penalty > 0. Padding candidates score -inf."""
    N, C, T = batch["tokens"].shape
    logits = module.apply(
        {"params": params},
        jnp.reshape(batch["tokens"], (N * C, T)),
        jnp.reshape(batch["attention_mask"], (N * C, T)),
        jnp.reshape(batch["position_ids"], (N * C, 2, T)),
        jnp.reshape(batch["prefix_len"], (N * C,)),
    )
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    tgt = jnp.reshape(batch["targets"], (N * C, T, 1))
    lp = jnp.take_along_axis(logp, tgt, axis=-1)[..., 0].reshape(N, C, T)
    mask = jnp.asarray(batch["score_mask"], jnp.float32)
    s = jnp.sum(lp * mask, axis=-1)
    if length_penalty > 0:
        s = s / jnp.maximum(jnp.sum(mask, axis=-1), 1.0) ** length_penalty
    return jnp.where(jnp.asarray(batch["choice_mask"]), s, -jnp.inf)


def cloze_loss(module, params, batch: dict, labels, length_penalty: float = 0.0):
    """Mean cross entropy of softmax(candidate_scores) against `labels` [N] (the right candidate's index)."""
    s = candidate_scores(module, params, batch, length_penalty)
    logp = jax.nn.log_softmax(s, axis=-1)
    picked = jnp.take_along_axis(logp, jnp.asarray(labels, jnp.int32)[:, None], axis=-1)[:, 0]
    return -jnp.mean(picked)


@functools.partial(jax.jit, static_argnames=("module", "length_penalty"))
def _scores_jit(module, params, batch, length_penalty):
    return candidate_scores(module, params, batch, length_penalty)


def score_examples(
    lm,
    examples: Sequence[Example],
    *,
    mask_id: int | None = None,
    sop_id: int | None = None,
    eop_id: int | None = None,
    tok=None,
    length_penalty: float = 0.0,
    include_eop: bool = True,
    batch_size: int = 8,
) -> list[np.ndarray]:
    """Scores of each example's candidates (a float array per example), in fixed-shape batches: examples are
    grouped by bucket length, padded to the largest candidate count and to `batch_size` examples."""
    if not lm.config.positions_2d:
        raise ValueError(
            f"cloze scoring needs GLM's 2-D positions (families glm, chatglm); this checkpoint is {lm.config.family}"
        )
    ids = special_ids(lm.config, tok, mask_id, sop_id, eop_id)
    kw = dict(mask_id=ids[0], sop_id=ids[1], eop_id=ids[2], pad_id=lm.config.pad_token_id or 0)
    C = max(len(e[1]) for e in examples)
    lengths = [bucket_length(len(e[0]) + len(e[2]) + 2 + max(len(c) for c in e[1])) for e in examples]
    groups: dict[int, list[int]] = {}
    for i, length in enumerate(lengths):
        groups.setdefault(length, []).append(i)
    out: list[np.ndarray | None] = [None] * len(examples)
    for length, members in sorted(groups.items(), reverse=True):
        for s in range(0, len(members), batch_size):
            idx = members[s : s + batch_size]
            chunk = [examples[i] for i in idx]
            chunk += [chunk[0]] * (batch_size - len(chunk))  # fixed batch shape
            batch = cloze_batch(chunk, include_eop=include_eop, length=length, num_choices=C, **kw)
            scores = np.asarray(_scores_jit(lm.module, lm.params, batch, float(length_penalty)))
            for j, i in enumerate(idx):
                out[i] = scores[j, : len(examples[i][1])]
    return out  # type: ignore[return-value]
