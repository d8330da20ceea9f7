"""GLMConfig reads every family's config.json, in every form transformers wrote it, and writes it back."""

import json

import pytest
from helpers.fixture_models import FIX, MODEL_FIXTURES

import glm_jax
from glm_jax import GLMConfig
from glm_jax.model.transformer import param_count

FAMILY = {
    "glm-original": "glm",
    "chatglm-6b": "chatglm",
    "chatglm2-6b": "chatglm2",
    "chatglm2-6b-ptuning-v2": "chatglm2",
    "chatglm3-6b-32k": "chatglm2",
    "glm-4-9b-chat-remote": "chatglm2",
    "transformers-glm": "glm-hf",
    "transformers-glm4": "glm4",
    "transformers-glm4-moe": "glm4-moe",
}


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_family_detection_and_lossless_round_trip(name):
    d = json.loads((FIX / name / "model" / "config.json").read_text())
    cfg = GLMConfig.from_hf(d)
    assert cfg.family == FAMILY[name]
    assert cfg.to_hf() == d  # every key kept, nothing added
    assert GLMConfig.from_hf(cfg.to_hf()) == cfg
    # a fresh config (no original) still reads back as the same model
    fresh = cfg.replace(hf_config=None).to_hf()
    assert GLMConfig.from_hf(fresh) == cfg


def test_rope_parameters_form_of_transformers_5():
    d = json.loads((FIX / "transformers-glm" / "model" / "config.json").read_text())
    theta, factor = d.pop("rope_theta"), d.pop("partial_rotary_factor")
    d5 = dict(d, rope_parameters={"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": factor})
    a, b = (
        GLMConfig.from_hf(d5),
        GLMConfig.from_hf(json.loads((FIX / "transformers-glm/model/config.json").read_text())),
    )
    assert a == b and a.rope_base == 5e6 and a.rope_dim == 8
    assert a.to_hf() == d5
    with pytest.raises(glm_jax.ConfigError, match="rope_type"):
        GLMConfig.from_hf(dict(d, rope_parameters={"rope_type": "yarn", "factor": 4.0}))


def test_original_glm_and_transformers_glm_share_model_type_but_not_family():
    glm = json.loads((FIX / "glm-original/model/config.json").read_text())
    hf = json.loads((FIX / "transformers-glm/model/config.json").read_text())
    assert glm["model_type"] == hf["model_type"] == "glm"
    assert GLMConfig.from_hf(glm).family == "glm" and GLMConfig.from_hf(hf).family == "glm-hf"


@pytest.mark.parametrize(
    "bad,msg",
    [
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "unrecognised"),
        ({"model_type": "chatglm", "auto_map": {"AutoModel": "modeling_chatglm.X"}}, "multi_query_group_num"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_configs_raise_config_error(bad, msg):
    with pytest.raises(glm_jax.ConfigError, match=msg):
        GLMConfig.from_hf(bad)


@pytest.mark.parametrize(
    "preset,params",
    [
        ("chatglm_6b", 6.173e9),
        ("chatglm3_6b", 6.244e9),
        ("glm4_9b", 9.400e9),
        ("glm4_9b_0414", 9.400e9),
        ("glm_10b", 9.88e9),
    ],
)
def test_presets_have_the_released_sizes(preset, params):
    cfg = GLMConfig.preset(preset).replace(scan_layers=True)  # the same params, stacked: traced faster
    assert abs(param_count(cfg) / params - 1) < 2e-3


def test_chatglm2_without_mqa_uses_per_head_qkv_rows():
    d = GLMConfig.preset("chatglm2_6b").to_hf()
    d.update(multi_query_attention=False)
    cfg = GLMConfig.from_hf(d)
    assert cfg.num_kv_heads == cfg.num_heads and cfg.qkv_per_head
