"""Finetuning from a checkpoint folder: model=<Hugging Face folder> starts from its weights."""

import jax
import numpy as np
from helpers.train_runs import CACHE, ROOT, checkpoint_steps, flat, losses, train

HF = ROOT / "tests" / "fixtures" / "transformers-glm" / "model"  # a tiny GlmForCausalLM, vocab 512


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, end of document 256: fits the fixture model's 512-id vocabulary."""

    special_tokens = {"</s>": 256}
    vocab_size = 257

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode(errors="replace")


def _config(out, *keys):
    from train.config import build

    tc = build(
        None,
        [
            f"model={HF}",
            "objective=causal",
            f"output_dir={out}",
            "batch_size=8",
            "seq_len=64",
            "log_every=1",
            "progress=none",
            f"compilation_cache_dir={CACHE}",
            *keys,
        ],
    )
    tc.data["tokenizer"] = ByteTokenizer()
    return tc


def test_finetune_from_hf_folder_starts_from_its_weights(tmp_path):
    import glm_jax
    from train.trainer import Run

    ref = flat(jax.tree.map(np.asarray, glm_jax.from_pretrained(HF).params))
    start = flat(jax.tree.map(np.asarray, Run(_config(tmp_path / "probe")).state["params"]))
    assert sorted(start) == sorted(ref)
    assert all(np.array_equal(start[k], ref[k]) for k in ref)
    out = tmp_path / "run"
    summary = train(_config(out, "steps=3", "learning_rate=1e-3"))
    assert summary["step"] == 3 and checkpoint_steps(out)[-1] == 3
    ls = losses(out)
    assert all(np.isfinite(v) for v in ls.values()) and ls[1] < np.log(512) + 1  # a trained model, not random
