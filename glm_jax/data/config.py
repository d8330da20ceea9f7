"""DataConfig: every knob of the data pipeline, plus the released GLM objective mixtures (THUDM/GLM
config/ds_block_*.sh)."""

from __future__ import annotations

import dataclasses
from typing import Any

OBJECTIVES = ("blank_infilling", "causal", "chatglm_prefix")

# THUDM/GLM config/ds_block_*.sh. bert = token level, sentence = [sMASK], rest = document.
MIXTURES: dict[str, dict[str, Any]] = {
    "glm_large": dict(
        bert_prob=1.0,
        gap_sentence_prob=0.0,
        gpt_min_ratio=0.5,
        task_mask=False,
        block_mask_prob=0.0,
        short_seq_prob=0.0,
        single_span_prob=0.0,
    ),
    "glm_10b": dict(
        bert_prob=0.5,
        gap_sentence_prob=0.3,
        gpt_min_ratio=0.25,
        task_mask=True,
        block_mask_prob=0.1,
        short_seq_prob=0.02,
        single_span_prob=0.0,
    ),
    "glm_10b_longer": dict(
        bert_prob=0.4,
        gap_sentence_prob=0.3,
        gpt_min_ratio=0.25,
        task_mask=True,
        block_mask_prob=0.1,
        short_seq_prob=0.5,
        single_span_prob=0.05,
    ),
    "glm_large_chinese": dict(
        bert_prob=0.4,
        gap_sentence_prob=0.3,
        gpt_min_ratio=0.25,
        task_mask=True,
        block_mask_prob=0.1,
        short_seq_prob=0.02,
        single_span_prob=0.0,
    ),
}
DEFAULT_MIXTURE = "glm_10b"


@dataclasses.dataclass
class DataConfig:
    """What the training loop passes to `make_pipeline` (as this dataclass or a plain dict).

    objective: 'blank_infilling' (GLM), 'causal' (plain next-token LM with packing; chatglm2/glm4),
      or 'chatglm_prefix' (ChatGLM-6B style `prefix [gMASK] <sop> target`, 2-D positions).
    seq_len: T of every row. batch_size: rows per batch *per process*. seed: everything derives from it.
    source: 'bundled' (the corpus in glm_jax/data/corpus), or a dict -- see `sources.open_source`.
    tokenizer: 'bundled' (a sentencepiece model trained on the bundled corpus, cached), a tokenizer
      folder / tokenizer.model path, or any object with `.encode(text) -> list[int]`.
    mixture: a name in MIXTURES; any of its fields given explicitly below (not None) wins.
    mixture_per: 'batch' (the reference: one objective per batch) or 'sample'.
    """

    objective: str = "blank_infilling"
    seq_len: int = 512
    batch_size: int = 8
    seed: int = 0
    source: Any = "bundled"
    tokenizer: Any = "bundled"
    # --- blank-infilling mixture (None = take it from `mixture`) ---
    mixture: str = DEFAULT_MIXTURE
    mixture_per: str = "batch"
    bert_prob: float | None = None
    gap_sentence_prob: float | None = None
    gpt_min_ratio: float | None = None
    task_mask: bool | None = None
    block_mask_prob: float | None = None
    short_seq_prob: float | None = None
    single_span_prob: float | None = None
    gpt_infill_prob: float = 0.5  # probability of the *prefix* layout in document-level batches
    bert_ratio: float = 0.15
    gap_sentence_ratio: float = 0.15
    avg_block_length: float = 3.0
    max_block_length: int = 40
    shuffle_blocks: bool = True
    block_position: bool = True
    # --- batches ---
    segment_ids: bool = False  # packed documents do not attend each other (see batching.py)
    # --- documents ---
    min_doc_tokens: int = 3  # shorter documents are skipped (and counted)
    max_doc_chars: int = 4_000_000  # longer documents are truncated (and counted)
    special_ids: dict | None = None  # overrides, e.g. {"cls": 3, "eos": 2, "dblock": 9}
    # --- objective=sft (glm-train; glm_jax/data/sft_batches.py): source is a .jsonl file or a folder of them ---
    format: str | None = None  # sft.FORMATS: chatglm3, chatglm3_finetune_hf, glm4, glm4_combine, ptuning_*
    packing: bool = True  # several conversations a row (segment ids); False: one a row
    # --- grain ---
    shard_index: int | None = None  # None: jax.process_index()
    shard_count: int | None = None  # None: jax.process_count()
    num_workers: int = 0  # >0: grain multiprocessing prefetch workers
    num_threads: int = 0  # >0: grain read threads (in-process)
    cache_dir: str | None = None  # default: $GLM_JAX_CACHE or ~/.cache/glm_jax

    @classmethod
    def from_any(cls, cfg: DataConfig | dict | None = None, **overrides) -> DataConfig:
        if cfg is None:
            cfg = {}
        if isinstance(cfg, DataConfig):
            cfg = cfg.as_dict()
        cfg = {**cfg, **overrides}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise ValueError(f"unknown data config keys {unknown}; valid keys: {sorted(names)}")
        out = cls(**cfg)
        out.validate()
        return out

    def as_dict(self) -> dict[str, Any]:
        """Shallow field dict (dataclasses.asdict would deep-copy a tokenizer object)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def resolved(self) -> dict[str, Any]:
        """The mixture fields after applying `mixture` defaults."""
        if self.mixture not in MIXTURES:
            raise ValueError(f"unknown mixture {self.mixture!r}; choose one of {sorted(MIXTURES)}")
        out = dict(MIXTURES[self.mixture])
        for k in out:
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        return out

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.mixture_per not in ("batch", "sample"):
            raise ValueError(f"mixture_per must be 'batch' or 'sample', got {self.mixture_per!r}")
        if self.seq_len < 16:
            raise ValueError(f"seq_len must be >= 16, got {self.seq_len}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        r = self.resolved()
        if not (
            0 <= r["bert_prob"] <= 1
            and 0 <= r["gap_sentence_prob"] <= 1
            and r["bert_prob"] + r["gap_sentence_prob"] <= 1 + 1e-9
        ):
            raise ValueError(
                "need 0 <= bert_prob, gap_sentence_prob and bert_prob + gap_sentence_prob <= 1; "
                f"got {r['bert_prob']}, {r['gap_sentence_prob']}"
            )
        if (self.shard_index is None) != (self.shard_count is None):
            raise ValueError("give both shard_index and shard_count, or neither")
        if self.shard_count is not None and not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"need 0 <= shard_index < shard_count, got {self.shard_index}, {self.shard_count}")
