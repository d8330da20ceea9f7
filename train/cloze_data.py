"""glm-train `objective=cloze data.source=PATH data.verbalizer={label: text, ...}`: GLM's classification
finetuning, each record's candidates scored by blank infilling (glm_jax/data/cloze.py builds the batches,
glm_jax/eval/cloze.py scores them; the loss is train/loss.py's cloze_sums). The tokenizer is `data.tokenizer`,
else the `model` folder's, else the bundled one. What was read is reported once: records, skipped lines with
file:line and reason."""

from __future__ import annotations

import pathlib
import sys

from train.config import TrainConfigError


def cloze_tokenizer(tc):
    from glm_jax.data.tokenize import resolve_tokenizer

    spec = tc.data.get("tokenizer")
    if spec in (None, "", "bundled"):
        spec = tc.model if pathlib.Path(tc.model).is_dir() else "bundled"
    try:
        return resolve_tokenizer(spec, tc.data.get("cache_dir"))
    except (ValueError, OSError) as e:
        raise TrainConfigError(f"data.tokenizer: {e}") from None


def make_cloze_batches(tc, rows: int, shard_index: int, shard_count: int, eval_split: bool = False, err=None):
    from glm_jax.data.cloze import ClozeBatches
    from glm_jax.data.tokenize import special_ids

    d = dict(tc.data)
    tok = cloze_tokenizer(tc)
    try:
        ids = special_ids(tok)
    except ValueError as e:
        raise TrainConfigError(f"data.tokenizer: {e}") from None
    missing = [n for n in ("mask", "sop", "eop") if getattr(ids, n) is None]
    if missing:
        raise TrainConfigError(f"objective=cloze needs the tokenizer's {', '.join(missing)} token(s)")
    source = d["source"]
    try:
        batches = ClozeBatches(
            source,
            tok,
            tc.seq_len,
            rows,
            ids=ids,
            verbalizer=d.get("verbalizer"),
            seed=tc.seed + (1_000_003 if eval_split else 0),
            shard_index=shard_index,
            shard_count=shard_count,
            include_eop=d.get("include_eop", True),
            length_penalty=float(d.get("length_penalty", 0.0)),
        )
    except (ValueError, OSError) as e:
        raise TrainConfigError(f"data.source: {e}") from None
    if shard_index == 0 and not eval_split:
        print(
            f"cloze data {source} ({batches.num_choices} candidates a record): {batches.report.summary()}",
            file=err or sys.stdout,
            flush=True,
        )
    return batches
