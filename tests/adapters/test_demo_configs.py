"""The bundled finetuning configs of THUDM's demos (train/configs/glm4_9b_chat_sft.yaml, glm4_9b_chat_lora.yaml,
chatglm3_6b_ptuning.yaml) parse with the demos' settings, name a slice, read bundled example data of their format,
and lay out (shapes only, nothing allocated) the trainable params the demos print."""

import math

import jax
import pytest
from helpers import ROOT

import glm_jax
from glm_jax.data import sft
from glm_jax.model.transformer import param_count
from train import parallel
from train.config import build
from train.trainer import model_config, state_layout


@pytest.mark.parametrize(
    "name, preset, trained, n",
    [
        # GLM-4 finetune_demo's LoRA: "trainable params: 2,785,280" (r 8 on query_key_value, 40 layers)
        ("glm4_9b_chat_lora", "glm4_9b", "lora", 40 * (8 * 4096 + 4608 * 8)),
        # P-Tuning v2: pre_seq_len 128 x (28 layers x 2 x 2 kv groups x 128)
        ("chatglm3_6b_ptuning", "chatglm3_6b", "prefix_encoder", 128 * 28 * 2 * 2 * 128),
        ("glm4_9b_chat_sft", "glm4_9b", None, None),
    ],
)
def test_demo_configs(name, preset, trained, n):
    tc = build(name, [])
    assert tc.objective == "sft" and tc.topology and tc.data["format"] in sft.FORMATS
    assert (ROOT / tc.data["source"]).is_file()
    if name == "glm4_9b_chat_lora":
        assert (tc.lora.rank, tc.lora.alpha, tc.lora.targets) == (8, 32.0, ["query_key_value"])
        assert tc.data["format"] == "glm4_combine" and tc.seq_len == 1024
    if name == "chatglm3_6b_ptuning":
        assert (tc.ptuning.pre_seq_len, tc.ptuning.prefix_projection) == (128, False)
    tc = build(name, [f"model={preset}", "mesh.fsdp=1"])
    cfg, _ = model_config(tc)
    lay = state_layout(tc, cfg, parallel.build_mesh(tc.mesh))
    params = lay["abstract"]["params"]
    count = lambda t: sum(math.prod(x.shape) for x in jax.tree.leaves(t))  # noqa: E731
    if trained is None:
        assert count(lay["abstract"]["opt_state"]) == 2 * count(params) + 1
        assert param_count(cfg) == param_count(glm_jax.GLMConfig.preset(preset))
    else:
        assert count(params[trained]) == n
        assert count(lay["abstract"]["opt_state"]) == 2 * n + 1
