"""Finetuning from a checkpoint folder: model=<Hugging Face folder> starts from its weights."""

import jax
import numpy as np
from helpers import FIX
from helpers.train_runs import checkpoint_steps, flat, folder_config, losses, train

HF = FIX / "transformers-glm" / "model"  # a tiny GlmForCausalLM, vocab 512


def _config(out, *keys):
    return folder_config(HF, out, "seq_len=64", *keys)


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
