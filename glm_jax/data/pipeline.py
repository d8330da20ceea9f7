"""The grain pipeline: units -> packed samples -> objective rows -> fixed-shape batches.

    MapDataset.range(units).shuffle(seed).repeat()     # per-epoch reshuffled sampling units
      .map_with_index((global_index, unit))            # the global index seeds every random draw
      [shard_index::shard_count]                       # this process' share
      .batch(batch_size).map(BatchMaker)               # pack + objective + collate, per batch
      .to_iter_dataset(ReadOptions) [.mp_prefetch(workers)]

Every draw derives from (seed, global sample index), so batches do not depend on worker count or
timing, and the iterator state ({'next_index': k}, plus the counters) is all a resume needs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np

from glm_jax.data import batching, objectives
from glm_jax.data.config import DataConfig
from glm_jax.data.packing import DocStore, PackSpec, build_sample, estimate_chars_per_token
from glm_jax.data.sources import SCAN_STATS, open_source, scan_lengths
from glm_jax.data.tokenize import resolve_tokenizer, sentence_end_table, special_ids

BATCH_STATS = (
    "docs_skipped_short",
    "docs_skipped_encode_error",
    "span_placement_retries",
    "samples_without_spans",
    "rows_token",
    "rows_sentence",
    "rows_document",
    "rows_causal",
    "rows_prefix",
    "tokens_nonpad",
    "tokens_loss",
)
STATE_VERSION = 1


class BatchMaker:
    """pairs [B, 2] of (global sample index, unit) -> one batch dict (runs in grain workers)."""

    def __init__(self, *, cfg: DataConfig, opts: dict, store: DocStore, tok, ids, is_end_V, spec: PackSpec):
        self.cfg, self.opts, self.store, self.tok = cfg, opts, store, tok
        self.ids, self.is_end_V, self.spec = ids, is_end_V, spec

    def __call__(self, pairs_B2: np.ndarray) -> dict:
        cfg, stats = self.cfg, {}
        samples, rngs = [], []
        for i, u in np.asarray(pairs_B2).tolist():
            pack_rng = np.random.default_rng([cfg.seed, 1, i])
            samples.append(build_sample(self.store, self.tok, u, pack_rng, self.spec, self.is_end_V, stats))
            rngs.append(np.random.default_rng([cfg.seed, 2, i]))
        batch_rng = np.random.default_rng([cfg.seed, 3, int(pairs_B2[0][0])])
        T = cfg.seq_len
        if cfg.objective == "blank_infilling":
            rows = objectives.blank_infilling_rows(
                samples,
                batch_rng,
                rngs,
                self.opts,
                self.ids,
                T,
                self.is_end_V,
                stats,
                per_sample=cfg.mixture_per == "sample",
            )
        elif cfg.objective == "causal":
            rows = [objectives.causal(s, T, cfg.segment_ids) for s in samples]
        else:  # chatglm_prefix: `prefix [gMASK] <sop> suffix`, one generation length per batch
            G = objectives.generation_length(
                [min(len(s), T - 1) for s in samples], batch_rng, self.opts["gpt_min_ratio"]
            )
            rows = [
                objectives.document_level(s, G, r, self.opts, self.ids, T, stats, mode="prefix", infill_prob=1.0)
                for s, r in zip(samples, rngs)
            ]
        two_d = cfg.objective == "chatglm_prefix" or (cfg.objective == "blank_infilling" and cfg.block_position)
        batch = batching.collate(rows, T, two_d=two_d, segment_ids=cfg.segment_ids)
        for row in rows:
            key = "rows_" + objectives.MODES[row["mode"]]
            stats[key] = stats.get(key, 0) + 1
        stats["tokens_nonpad"] = sum(len(r["tokens"]) for r in rows)
        stats["tokens_loss"] = int(batch["loss_mask"].sum())
        batch["_stats"] = np.array([stats.get(k, 0) for k in BATCH_STATS], np.int64)
        return batch


def _pair(index, unit):
    return np.array([index, unit], np.int64)


class Pipeline:
    """Iterator over numpy batches (see batching.py for keys and shapes).

    get_state() -> JSON-able dict; set_state(state) on a pipeline built with the same config resumes
    exactly. `stats` counts bad data (scan-time: empty / malformed / huge documents, and documents whose invalid
    UTF-8 was replaced with U+FFFD; run-time: short documents, span retries, rows per objective, tokens).
    `invalid_utf8_files`: {file: invalid UTF-8 byte sequences replaced} for the local files that have any.
    """

    def __init__(self, cfg: DataConfig, *, tokenizer=None, source=None):
        import grain

        self.cfg = cfg
        self.tokenizer = resolve_tokenizer(tokenizer if tokenizer is not None else cfg.tokenizer, cfg.cache_dir)
        self.ids = special_ids(self.tokenizer, cfg.special_ids)
        opts = {**cfg.as_dict(), **cfg.resolved()}
        self._check_ids(opts)
        src = open_source(source if source is not None else cfg.source, cfg.cache_dir)
        self.invalid_utf8_files = dict(src.invalid_utf8)
        chars_D, self._scan_stats = scan_lengths(src, cfg.max_doc_chars, cfg.cache_dir)
        store = DocStore(src, chars_D, cfg.max_doc_chars)
        self._corpus_shape = [len(chars_D), store.total]
        if store.total == 0:
            raise ValueError(f"the data source has no usable documents: {self._scan_stats}")
        is_end_V = sentence_end_table(self.tokenizer, self.ids)
        max_len = {"blank_infilling": cfg.seq_len, "causal": cfg.seq_len + 1, "chatglm_prefix": cfg.seq_len - 1}
        cpt = estimate_chars_per_token(store, self.tokenizer)
        L = max_len[cfg.objective]
        self.spec = PackSpec(
            max_len=L,
            eos_id=self.ids.eos,
            cls_id=self.ids.cls if cfg.objective == "blank_infilling" else None,
            unit_chars=max(16, int((L - 1) * cpt)),
            chars_per_token=cpt,
            min_doc_tokens=cfg.min_doc_tokens,
            right_strip=cfg.objective == "blank_infilling",
        )
        if cfg.shard_count is None:
            import jax

            self.shard_index, self.shard_count = jax.process_index(), jax.process_count()
        else:
            self.shard_index, self.shard_count = cfg.shard_index, cfg.shard_count
        self.units_per_epoch = self.spec.num_units(store)
        maker = BatchMaker(
            cfg=cfg, opts=opts, store=store, tok=self.tokenizer, ids=self.ids, is_end_V=is_end_V, spec=self.spec
        )
        ds = grain.MapDataset.range(self.units_per_epoch).shuffle(seed=cfg.seed).repeat(None)
        ds = ds.map_with_index(_pair)[self.shard_index :: self.shard_count]
        ds = ds.batch(cfg.batch_size, batch_fn=np.stack).map(maker)
        it = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=max(2, 2 * cfg.num_threads))
        )
        if cfg.num_workers > 0:
            from absl import flags  # grain workers read absl flags; unparsed flags would crash them

            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
        self._it = iter(it)
        self._batch_stats = dict.fromkeys(BATCH_STATS, 0)
        self.batches_seen = 0
        self.fingerprint = self._fingerprint()

    def _check_ids(self, opts):
        i, need = self.ids, []
        if self.cfg.objective == "blank_infilling":
            need = ["sop", "eop", "mask"] + (["dblock"] if opts["block_mask_prob"] > 0 else [])
        elif self.cfg.objective == "chatglm_prefix":
            need = ["sop", "gmask"]
        missing = [k for k in need if getattr(i, k) is None]
        if missing:
            hint = " (or set block_mask_prob=0)" if "dblock" in missing else ""
            raise ValueError(
                f"objective {self.cfg.objective!r} needs command tokens {missing} that the tokenizer "
                f"does not name; pass special_ids={{...}} in the data config{hint}"
            )

    def _fingerprint(self) -> str:
        c = self.cfg.as_dict()
        keep = {k: v for k, v in c.items() if k not in ("cache_dir", "num_threads", "tokenizer", "source")}
        vocab = getattr(self.tokenizer, "vocab_size", None)
        keep.update(
            shard=[self.shard_index, self.shard_count],
            units=self.units_per_epoch,
            spec=dataclasses.asdict(self.spec),
            ids=dataclasses.asdict(self.ids),
            vocab=vocab() if callable(vocab) else vocab,
            docs=self._corpus_shape,
        )
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        for k, v in zip(BATCH_STATS, batch.pop("_stats").tolist()):
            self._batch_stats[k] += v
        self.batches_seen += 1
        return batch

    @property
    def stats(self) -> dict[str, int]:
        return {
            **{k: self._scan_stats.get(k, 0) for k in SCAN_STATS},
            **self._batch_stats,
            "batches": self.batches_seen,
        }

    def get_state(self) -> dict:
        return {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "grain": self._it.get_state(),
            "batches": self.batches_seen,
            "stats": dict(self._batch_stats),
        }

    def set_state(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION or state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                "this data state was saved by a pipeline with a different config, data, tokenizer "
                f"or sharding (fingerprint {state.get('fingerprint')} != {self.fingerprint}); "
                "resume with the same data config"
            )
        self._it.set_state(state["grain"])
        self.batches_seen = int(state["batches"])
        self._batch_stats = {k: int(state["stats"].get(k, 0)) for k in BATCH_STATS}

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_pipeline(cfg: DataConfig | dict | None = None, *, tokenizer=None, source=None, **overrides) -> Pipeline:
    """Builds the data pipeline; see the glm_jax.data module docstring."""
    return Pipeline(DataConfig.from_any(cfg, **overrides), tokenizer=tokenizer, source=source)
