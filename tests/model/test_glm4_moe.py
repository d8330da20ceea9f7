"""Glm4Moe (GLM-4.5 / 4.6 / 4.7) beyond what every family shares (golden logits, hidden states and greedy ids are in
model/test_fixtures.py, scan/remat/mesh in model/test_variants.py): the MTP layer and router bias kept as stored,
config.json read and written back, the presets at the released sizes, bf16 loading."""

import json

import jax
import numpy as np
import pytest
from helpers.fixture_models import FIX, io, max_diff, reference_inputs
from safetensors.numpy import load_file

import glm_jax
from glm_jax import GLMConfig
from glm_jax.model.transformer import param_count

NAME = "transformers-glm4-moe"


@pytest.fixture(scope="module")
def lm():
    return glm_jax.from_pretrained(FIX / NAME / "model")


def test_mtp_layer_and_router_bias_are_loaded_as_stored(lm):
    """(Logits, hidden states and greedy ids: model/test_fixtures.py, which covers this fixture with the others.)"""
    assert lm.config.family == "glm4-moe" and lm.config.num_mtp_layers == 1
    st = load_file(FIX / NAME / "model" / "model.safetensors")
    p = lm.params
    m = p["mtp_0"]
    np.testing.assert_array_equal(m["eh_proj"]["kernel"], st["model.layers.3.eh_proj.weight"].T)
    np.testing.assert_array_equal(m["embed"]["embedding"], st["model.layers.3.embed_tokens.weight"])
    np.testing.assert_array_equal(m["head"]["kernel"], st["model.layers.3.shared_head.head.weight"].T)
    np.testing.assert_array_equal(m["head_norm"]["scale"], st["model.layers.3.shared_head.norm.weight"])
    for e in range(8):
        np.testing.assert_array_equal(
            m["block"]["moe"]["experts"]["down"][e], st[f"model.layers.3.mlp.experts.{e}.down_proj.weight"].T
        )
        np.testing.assert_array_equal(
            p["layers_2"]["block"]["moe"]["experts"]["gate"][e],
            st[f"model.layers.2.mlp.experts.{e}.gate_proj.weight"].T,
        )
    np.testing.assert_array_equal(
        p["layers_1"]["block"]["moe"]["router"]["score_bias"], st["model.layers.1.mlp.gate.e_score_correction_bias"]
    )
    assert "mlp" in p["layers_0"]["block"] and "moe" not in p["layers_0"]["block"]  # first_k_dense_replace = 1


def test_config_json_round_trip_and_mlp_layer_types():
    d = json.loads((FIX / NAME / "model" / "config.json").read_text())
    cfg = GLMConfig.from_hf(d)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.n_shared_experts, cfg.moe_intermediate_size) == (8, 2, 1, 32)
    assert (cfg.n_group, cfg.topk_group, cfg.first_k_dense_replace, cfg.routed_scaling_factor) == (2, 1, 1, 2.5)
    assert cfg.qk_norm and cfg.norm_topk_prob and cfg.qkv_bias and cfg.rope_dim == 16 and cfg.rope_base == 1e6
    assert cfg.position_encoding == "rope_half" and cfg.position_rule == "sequential" and cfg.num_mtp_layers == 1
    assert cfg.to_hf() == d
    assert GLMConfig.from_hf(cfg.replace(hf_config=None).to_hf()) == cfg
    # transformers 5.x may write the dense/MoE pattern as mlp_layer_types
    d5 = {k: v for k, v in d.items() if k != "first_k_dense_replace"}
    d5["mlp_layer_types"] = ["dense", "dense", "sparse"]
    c5 = GLMConfig.from_hf(d5)
    assert c5.first_k_dense_replace == 2 and c5.to_hf() == d5
    with pytest.raises(glm_jax.ConfigError, match="mlp_layer_types"):
        GLMConfig.from_hf(dict(d5, mlp_layer_types=["dense", "sparse", "dense"]))
    with pytest.raises(glm_jax.ConfigError, match="n_group"):
        GLMConfig.from_hf(dict(d, n_group=3))


def test_checkpoint_without_mtp_weights_loads_without_mtp(tmp_path):
    """save_pretrained keeps num_nextn_predict_layers=1 in config.json but writes no MTP weights."""
    from safetensors.numpy import save_file

    st = load_file(FIX / NAME / "model" / "model.safetensors")
    save_file({k: v for k, v in st.items() if not k.startswith("model.layers.3.")}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((FIX / NAME / "model" / "config.json").read_text())
    m = glm_jax.from_pretrained(tmp_path)
    assert m.config.num_mtp_layers == 0 and "mtp_0" not in m.params
    assert m.config.to_hf()["num_nextn_predict_layers"] == 1  # config.json written back unchanged


def _transformers_sizes(cfg):
    """(main, MTP) element counts of the tensors a checkpoint of cfg stores, from transformers' own modules built on
    the meta device (nothing allocated): Glm4MoeForCausalLM's state dict (params and the routers' score-bias
    buffers), and transformers' MtpLayer for the MTP layer plus the embedding and head copies that the released
    checkpoints (and the fixture) store in it as model.layers.N.embed_tokens / shared_head.head."""
    import torch
    import transformers
    from transformers.modeling_layers import MtpLayer
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeDecoderLayer, Glm4MoeRMSNorm

    d = cfg.to_hf()
    d["routed_scaling_factor"] = float(d["routed_scaling_factor"])  # transformers' strict config wants a float
    hf = transformers.Glm4MoeConfig(**d)
    with torch.device("meta"):
        model = transformers.Glm4MoeForCausalLM(hf)
        mtp = MtpLayer(hf.get_mtp_config(), Glm4MoeDecoderLayer, Glm4MoeRMSNorm, 0)
    main = sum(t.numel() for t in model.state_dict().values())
    copies = 2 * hf.vocab_size * hf.hidden_size
    return main, sum(t.numel() for t in mtp.state_dict().values()) + copies


# The model cards: GLM-4.5 355B total / 32B active, GLM-4.5-Air 106B / 12B (without the MTP layer; active = the
# transformer layers a token passes through, embeddings and output layer not counted). The Hugging Face pages
# count every stored tensor, the MTP layer included: 358B and 110B. GLM-4.6 has GLM-4.5's shape.
@pytest.mark.parametrize(
    "preset,total,stored,active",
    [("glm4_5", 355e9, 358e9, 32e9), ("glm4_5_air", 106e9, 110e9, 12e9), ("glm4_6", 355e9, 358e9, 32e9)],
)
def test_presets_have_the_released_sizes(preset, total, stored, active):
    cfg = GLMConfig.preset(preset).replace(scan_layers=True)  # the same params, stacked: traced ~9x faster
    shapes = glm_jax.param_shapes(cfg)
    n = {k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v)) for k, v in shapes.items()}
    main = sum(v for k, v in n.items() if not k.startswith("mtp_"))
    assert abs(main / total - 1) < 0.01, main
    assert abs(param_count(cfg) / stored - 1) < 0.005, param_count(cfg)
    hf_main, hf_mtp = _transformers_sizes(cfg)
    assert main == hf_main and n["mtp_0"] == hf_mtp and param_count(cfg) == hf_main + hf_mtp
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    moe_layers = cfg.num_layers - cfg.first_k_dense_replace
    act = main - moe_layers * (cfg.num_experts - cfg.num_experts_per_tok) * per_expert - n["embed"] - n["lm_head"]
    assert abs(act / active - 1) < 0.02, act
    # the model flops glm-train divides by (MFU, compile_only's XLA/model ratio) count these active params + the head
    from train.flops import active_matmul_params

    assert abs(active_matmul_params(cfg) - (act + n["lm_head"])) < 1e-6 * act


def test_bfloat16_load_keeps_the_router_bias_in_float32():
    d = io(NAME)
    kw, real = reference_inputs(NAME, d)
    m = glm_jax.from_pretrained(FIX / NAME / "model", dtype="bfloat16")
    st = load_file(FIX / NAME / "model" / "model.safetensors")
    bias = m.params["layers_1"]["block"]["moe"]["router"]["score_bias"]
    assert bias.dtype == np.float32
    np.testing.assert_array_equal(bias, st["model.layers.1.mlp.gate.e_score_correction_bias"])
    assert m.params["layers_1"]["block"]["moe"]["experts"]["gate"].dtype == jax.numpy.bfloat16
    logits = np.asarray(m(d["input_ids"], **kw))
    assert np.isfinite(logits).all() and max_diff(logits, d["logits"], real) < 0.1
