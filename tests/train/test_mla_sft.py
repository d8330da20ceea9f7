"""Full SFT of a tiny GLM-4.7-Flash (glm4-moe-lite, MLA, the fixture's shapes and MTP layer) with glm-train, with
the MTP loss (`mtp_loss_weight`, GLM-4.5's recipe) on: a few steps on the bundled GLM-4 chat examples, scan_layers
with the experts split over the mesh's expert axis. The losses are finite and go down, the MTP loss is logged and
goes down, and every trained MLA projection and the MTP layer move."""

import numpy as np
from helpers import SFT_EXAMPLES as EXAMPLES
from helpers.adapter_models import build_glm4_moe_lite_chat
from helpers.train_runs import CACHE, flat, load_params, metrics

import glm_jax


def test_sft_with_mtp_loss(tmp_path):
    from train.config import build
    from train.trainer import train

    base, run = tmp_path / "base", tmp_path / "run"
    build_glm4_moe_lite_chat(base, seed=5, mtp=True)
    assert glm_jax.from_pretrained(base).config.num_mtp_layers == 1
    tc = build(
        None,
        [
            f"model={base}",
            "objective=sft",
            "data.format=glm4",
            f"data.source={EXAMPLES / 'glm4_chat.jsonl'}",
            "seq_len=64",
            "batch_size=4",
            "steps=4",
            "log_every=1",
            "checkpoint_every=4",
            "learning_rate=1e-2",
            "warmup_steps=1",
            "mtp_loss_weight=0.3",
            "scan_layers=true",
            "mesh.data=2",
            "mesh.expert=2",
            f"output_dir={run}",
            "progress=none",
            f"compilation_cache_dir={CACHE}",
        ],
    )
    train(tc)
    m = metrics(run)
    assert [r["step"] for r in m] == [1, 2, 3, 4]
    loss, mtp = [r["loss"] for r in m], [r["mtp_loss"] for r in m]
    assert all(np.isfinite(loss)) and all(np.isfinite(mtp)), (loss, mtp)
    assert loss[-1] < loss[0] and mtp[-1] < mtp[0], (loss, mtp)

    ref = flat(glm_jax.from_pretrained(base, scan_layers=True).params)
    got = flat(load_params(run, 4))
    moved = {k for k in ref if not np.array_equal(np.asarray(ref[k]), np.asarray(got[k]))}
    for part in ("attn/q_a/kernel", "attn/q_b/kernel", "attn/kv_a/kernel", "attn/k_rope/kernel", "attn/kv_b/kernel"):
        assert any(k.endswith(part) and not k.startswith("mtp_") for k in moved), part
        assert any(k.startswith("mtp_0/") and k.endswith(part) for k in moved), part
    assert "mtp_0/eh_proj/kernel" in moved
