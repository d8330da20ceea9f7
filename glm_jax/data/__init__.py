"""glm_jax.data: GLM pretraining data -- read -> tokenize -> pack -> objective -> batch, on grain.

API for the training loop
-------------------------
    from glm_jax import data
    pipe = data.make_pipeline({"objective": "blank_infilling", "seq_len": 1024, "batch_size": 8,
                               "seed": 0, "tokenizer": "bundled", "source": "bundled"})
    batch = next(pipe)                 # dict of numpy arrays, shapes below
    state = pipe.get_state()           # small JSON-able dict: store it with the checkpoint
    pipe2 = data.make_pipeline(same_cfg); pipe2.set_state(state)   # continues with the same batches
    pipe.stats                         # {'docs_skipped_empty': .., 'docs_invalid_utf8_replaced': .., ...}
    pipe.invalid_utf8_files            # {file: invalid UTF-8 sequences replaced with U+FFFD} (local files)
    pipe.close()                       # or use `with data.make_pipeline(...) as pipe:`

make_pipeline(cfg: DataConfig | dict | None = None, *, tokenizer=None, source=None, **overrides) -> Pipeline
    cfg keys (DataConfig, config.py): objective 'blank_infilling' | 'causal' | 'chatglm_prefix';
    seq_len; batch_size (per process); seed; source; tokenizer; mixture ('glm_10b' default, 'glm_large',
    'glm_10b_longer', 'glm_large_chinese') and its fields (bert_prob, gap_sentence_prob, gpt_min_ratio,
    task_mask, block_mask_prob, short_seq_prob, single_span_prob); mixture_per 'batch' | 'sample';
    segment_ids; block_position; shard_index / shard_count (default jax.process_index/count);
    num_workers (grain multiprocessing) / num_threads; cache_dir; special_ids overrides.
    tokenizer / source arguments override the config's (e.g. pass a loaded tokenizer object).

Batch: tokens, targets (already aligned, never shift), loss_mask float32, position_ids [B, 2, T]
(GLM 2-D; [B, T] for causal or block_position=False), prefix_len [B] (= sep; causal 0), mode [B],
and segment_ids [B, T] when segment_ids=True. Model attention: key k visible to query q iff
k < prefix_len or k <= q (and same segment); `attention_mask(prefix_len, T, segment_ids, xp=jnp)`
builds it on device.

Sources: 'bundled' (public-domain Shakespeare/Milton, glm_jax/data/corpus), local files
{'files': [...], 'format': 'text'|'jsonl', 'doc_split': ...} written once as a TFDS array_record
dataset by the GlmLocalText builder, or any prepared TFDS dataset {'tfds': name, 'data_dir': dir}
read with tfds.data_source (no TensorFlow). Tokenizers: 'bundled' (sentencepiece trained on the
corpus, cached), a tokenizer path (via glm_jax.tokenizers.load_tokenizer), or any object with
.encode(text) -> list[int] and a special_tokens dict.

Resume: get_state() holds grain's iterator position plus counters; every random draw is keyed by
(seed, global sample index), so restored pipelines (with the same config, data, tokenizer, shard
and num_workers) yield exactly the batches the original would have.
"""

from glm_jax.data.batching import attention_mask, collate
from glm_jax.data.config import MIXTURES, DataConfig
from glm_jax.data.pipeline import Pipeline, make_pipeline
from glm_jax.data.sources import build_local_text, bundled_files, open_source
from glm_jax.data.tokenize import bundled_tokenizer, resolve_tokenizer, special_ids

__all__ = [
    "DataConfig",
    "MIXTURES",
    "Pipeline",
    "make_pipeline",
    "attention_mask",
    "collate",
    "build_local_text",
    "bundled_files",
    "open_source",
    "bundled_tokenizer",
    "resolve_tokenizer",
    "special_ids",
]
