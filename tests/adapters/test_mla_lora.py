"""LoRA on the MLA projections of GLM-4.7-Flash (glm4-moe-lite): `lora.targets` names q_a_proj, q_b_proj (or q_proj
without a q latent), kv_a_proj_with_mqa (one adapter on the fused [latent | rotary key] weight, split over two
kernels), kv_b_proj and o_proj as PEFT names them. A glm-train LoRA run on a tiny GLM-4.7-Flash at the fixture's
shapes, exported with `glm-convert to-torch RUN DST --adapter`: peft loads the adapter onto transformers'
Glm4MoeLiteForCausalLM and gives glm-jax's logits to 1e-4 (float32 on both sides)."""

import json

import numpy as np
import pytest
from helpers import FIX
from helpers import SFT_EXAMPLES as EXAMPLES
from helpers.adapter_models import build_glm4_moe_lite_chat
from helpers.train_runs import CACHE, metrics

import glm_jax
from convert.cli import main as convert_main
from glm_jax import adapters

FIX_LITE = FIX / "transformers-glm4-moe-lite" / "model"
TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]

# a GLM-4 chat turn in the stand-in tokenizer's ids (the adapter tests' input)
IDS = np.array([[1002, 1004, 1007, 198, 413, 442, 1008, 198, 39, 72, 565, 17, 300, 5]])


def _train(base, run, steps, extra=()):
    from train.config import build
    from train.trainer import train

    tc = build(
        None,
        [
            f"model={base}",
            "objective=sft",
            "data.format=glm4",
            f"data.source={EXAMPLES / 'glm4_chat.jsonl'}",
            "seq_len=64",
            "batch_size=4",
            f"steps={steps}",
            "log_every=1",
            "checkpoint_every=100",
            "learning_rate=3e-2",
            "warmup_steps=1",
            "lora.rank=4",
            "lora.alpha=8",
            f"lora.targets=[{', '.join(TARGETS)}]",
            "scan_layers=true",
            "mesh.data=2",
            "mesh.fsdp=2",
            "mesh.tensor=2",
            f"output_dir={run}",
            "progress=none",
            f"compilation_cache_dir={CACHE}",
            *extra,
        ],
    )
    return train(tc)


def test_lora_run_on_mla_exports_to_peft(tmp_path):
    import peft
    import torch

    base = tmp_path / "base"
    model = build_glm4_moe_lite_chat(base, seed=3)
    run = tmp_path / "run"
    _train(base, run, steps=3)
    m = metrics(run)
    assert [r["step"] for r in m] == [1, 2, 3] and m[-1]["loss"] < m[0]["loss"]
    cfg = json.loads((run / adapters.ADAPTER_CONFIG).read_text())
    assert sorted(cfg["target_modules"]) == sorted(TARGETS)

    ours = np.asarray(glm_jax.from_pretrained(run)(IDS))
    plain = np.asarray(glm_jax.from_pretrained(base)(IDS))
    assert np.abs(ours - plain).max() > 1e-3  # the adapter changes the logits

    exp = tmp_path / "adapter"
    assert convert_main(["to-torch", str(run), str(exp), "--adapter"]) == 0
    pm = peft.PeftModel.from_pretrained(model, exp).eval()
    names = [k for k, _ in pm.named_parameters() if "lora_A" in k]
    assert len(names) == 3 * len(TARGETS)  # 3 layers x 5 projections
    assert all(any(f".{t}.lora_A" in k for k in names) for t in TARGETS)
    # every adapter trained: B starts at zero
    lm = glm_jax.from_pretrained(base)
    sites = adapters.lora_sites(lm.config, TARGETS)
    _, ab = adapters.read_peft_adapter(exp, sites)
    assert all(np.abs(ab[s.module]["B"]).max() > 1e-4 for s in sites)
    with torch.no_grad():
        theirs = pm(torch.tensor(IDS)).logits.numpy()
    assert np.abs(ours - theirs).max() < 1e-4


@pytest.mark.parametrize("q_lora", [True, False])
def test_peft_adapter_on_every_mla_projection(tmp_path, q_lora):
    """A random adapter (B not zero) on every MLA projection, written as PEFT's files: peft on transformers'
    model and apply_lora on ours give the same logits; without a q latent the query's linear is q_proj."""
    import peft
    import torch
    import transformers

    d = json.loads((FIX_LITE / "config.json").read_text())
    if not q_lora:
        d["q_lora_rank"] = None
    for k in ("architectures", "model_type", "transformers_version"):
        d.pop(k)
    torch.manual_seed(1)
    model = transformers.Glm4MoeLiteForCausalLM(transformers.Glm4MoeLiteConfig(**d)).eval()
    model.save_pretrained(tmp_path / "base")
    targets = (["q_a_proj", "q_b_proj"] if q_lora else ["q_proj"]) + ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    lm = glm_jax.from_pretrained(tmp_path / "base")
    sites = adapters.lora_sites(lm.config, targets)
    assert len(sites) == 3 * len(targets)  # no MTP layer in a transformers save
    rng = np.random.default_rng(0)
    ab = {
        s.module: {
            "A": rng.normal(0, 0.3, (4, s.in_features)).astype(np.float32),
            "B": rng.normal(0, 0.3, (s.out_features, 4)).astype(np.float32),
        }
        for s in sites
    }
    adapters.write_peft_adapter(tmp_path / "adapter", ab, sites, rank=4, alpha=8)
    ids = np.asarray([[5, 17, 300, 42, 7, 99, 256, 3, 11, 480]])
    with torch.no_grad():
        plain = model(torch.tensor(ids)).logits.numpy()  # before peft wraps the model's linears in place
        pm = peft.PeftModel.from_pretrained(model, tmp_path / "adapter").eval()
        theirs = pm(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(lm.module.apply({"params": adapters.apply_lora(lm.params, ab, sites, 8 / 4)}, ids))
    assert np.abs(theirs - plain).max() > 1e-2  # the adapter matters
    assert np.abs(ours - theirs).max() < 1e-4
