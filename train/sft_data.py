"""glm-train `objective=sft data.format=FORMAT data.source=PATH` (DESIGN §3.5): the SFT batches of
glm_jax/data/sft_batches.py for this process's rows, with the tokenizer of `data.tokenizer`, else of the
`model` folder. What was read is reported once: records, skipped lines with file:line and reason, records the
reference drops, records cut to seq_len."""

from __future__ import annotations

import pathlib
import sys

from train.config import TrainConfigError

SFT_KEYS = {"source", "tokenizer", "format", "packing", "cache_dir"}


def sft_tokenizer(tc):
    from glm_jax.tokenizers import load_tokenizer

    spec = tc.data.get("tokenizer")
    if spec in (None, "", "bundled"):
        if not pathlib.Path(tc.model).is_dir():
            raise TrainConfigError(
                "objective=sft needs the chat model's tokenizer: model=<checkpoint folder> or data.tokenizer=<folder>"
            )
        spec = tc.model
    try:
        return load_tokenizer(spec)
    except (ValueError, OSError) as e:
        raise TrainConfigError(f"data.tokenizer: {e}") from None


def make_sft_batches(tc, rows: int, shard_index: int, shard_count: int, eval_split: bool = False, err=None):
    from glm_jax.data import sft
    from glm_jax.data.sft_batches import SFTBatches

    d = dict(tc.data)
    other = sorted(k for k in d if k not in SFT_KEYS and d[k] is not None)
    if other:
        raise TrainConfigError(f"objective=sft takes data.{', data.'.join(sorted(SFT_KEYS))}; got data.{other[0]}")
    fmt, source = d.get("format"), d.get("source")
    if fmt not in sft.FORMATS:
        raise TrainConfigError(f"objective=sft needs data.format, one of {', '.join(sft.FORMATS)}; got {fmt!r}")
    if not isinstance(source, str) or source in ("", "bundled"):
        raise TrainConfigError("objective=sft needs data.source=<a .jsonl file or a folder of them>")
    tok = sft_tokenizer(tc)
    try:
        batches = SFTBatches(
            source,
            tok,
            fmt,
            tc.seq_len,
            rows,
            seed=tc.seed + (1_000_003 if eval_split else 0),
            shard_index=shard_index,
            shard_count=shard_count,
            packing=bool(d.get("packing", True)),
        )
    except (ValueError, OSError) as e:
        raise TrainConfigError(f"data.source: {e}") from None
    if shard_index == 0 and not eval_split:
        print(f"sft data {source} ({fmt}): {batches.report.summary()}", file=err or sys.stdout, flush=True)
    return batches
