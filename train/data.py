"""Glue between glm-train and the data pipeline (glm_jax.data.make_pipeline).

Each process builds the pipeline for the rows of the global batch that its devices hold: the pipeline's
`shard_index::shard_count` split hands every process a disjoint share of the global sample indices, and
`parallel.global_batch` assembles the global batch with jax.make_array_from_process_local_data. Because every
random draw derives from (seed, global sample index), a run on several processes sees the same samples as a
run on one (in another row order), provided the objective is drawn per sample (`data.mixture_per=sample`,
or the causal objective); with the reference's per-batch draw each process draws for its own share.
"""

from __future__ import annotations

import sys

import numpy as np

from train.config import TrainConfigError

DEVICE_KEYS = ("tokens", "targets", "loss_mask", "position_ids", "prefix_len", "segment_ids")
# objective=cloze (glm_jax/data/cloze.py): train/loss.py scores candidates when a batch has choice_mask
CLOZE_KEYS = ("tokens", "attention_mask", "position_ids", "prefix_len", "targets", "score_mask", "choice_mask")
CLOZE_KEYS += ("labels", "length_penalty")
EVAL_SEED_OFFSET = 1_000_003  # eval batches: the same corpus drawn with another seed


def process_rows(sharding, global_rows: int) -> tuple[int, int]:
    """[lo, hi): the rows of the global batch that this process's devices hold (one contiguous block)."""
    idx = sharding.addressable_devices_indices_map((global_rows,))
    spans = sorted({(s[0].start or 0, s[0].stop if s[0].stop is not None else global_rows) for s in idx.values()})
    lo, hi = spans[0][0], spans[-1][1]
    if sum(b - a for a, b in spans) != hi - lo:
        raise TrainConfigError(
            "this process's devices hold a non-contiguous part of the batch; "
            "order the mesh so that each process's devices are adjacent"
        )
    return lo, hi


def data_config(tc, rows: int, shard_index: int, shard_count: int, eval_split: bool = False) -> dict:
    extra = dict(tc.data)
    for k in ("objective", "seq_len", "batch_size", "seed", "shard_index", "shard_count"):
        if k in extra:
            raise TrainConfigError(
                f"data.{k}: set the top-level key {k!r} instead"
                if k not in ("shard_index", "shard_count")
                else f"data.{k} is set by glm-train from the mesh and process index"
            )
    seed = tc.seed + (EVAL_SEED_OFFSET if eval_split else 0)
    return dict(
        objective=tc.objective,
        seq_len=tc.seq_len,
        batch_size=rows,
        seed=seed,
        shard_index=shard_index,
        shard_count=shard_count,
        **extra,
    )


def make_batches(tc, rows: int, shard_index: int, shard_count: int, eval_split: bool = False, err=None):
    """An iterator of numpy batches with get_state()/set_state() (a glm_jax.data Pipeline). The first shard's
    training pipeline reports each data file whose invalid UTF-8 was replaced, one line a file on `err`."""
    from glm_jax.data.pipeline import make_pipeline

    try:
        pipe = make_pipeline(data_config(tc, rows, shard_index, shard_count, eval_split))
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise TrainConfigError(f"data: {e}") from None
    if shard_index == 0 and not eval_split:
        for path, n in sorted(pipe.invalid_utf8_files.items()):
            print(
                f"warning: data: {path}: {n} invalid UTF-8 byte sequence(s) replaced with U+FFFD (kept, not dropped)",
                file=err or sys.stderr,
                flush=True,
            )
    return pipe


def batch_maker(objective: str):
    """make_batches, or the SFT / cloze equivalent: (tc, rows, shard_index, shard_count, eval_split) -> batches."""
    if objective == "sft":
        from train.sft_data import make_sft_batches

        return make_sft_batches
    if objective == "cloze":
        from train.cloze_data import make_cloze_batches

        return make_cloze_batches
    if objective == "dpo":
        from train.rl.dpo_data import make_dpo_batches

        return make_dpo_batches
    return make_batches


def to_device_dict(batch: dict, nan_at=None) -> dict:
    """The keys the step reads, with loss_mask (a cloze batch: score_mask) as float32 (optionally poisoned with
    a NaN, for tests)."""
    if "chosen_mask" in batch:  # objective=dpo (train/rl/dpo_data.py): its arrays as they are
        return {k: np.asarray(v) for k, v in batch.items()}
    cloze = "choice_mask" in batch
    out = {k: np.asarray(batch[k]) for k in (CLOZE_KEYS if cloze else DEVICE_KEYS) if k in batch}
    m = "score_mask" if cloze else "loss_mask"
    out[m] = out[m].astype(np.float32)
    if nan_at:
        out[m] = out[m].copy()
        out[m][(0,) * out[m].ndim] = np.nan
    return out


def vocab_size(pipeline) -> int:
    tok = pipeline.tokenizer
    v = getattr(tok, "vocab_size", None)
    return int(v() if callable(v) else v) if v is not None else 0
