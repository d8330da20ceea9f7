"""Glm4Moe (GLM-4.5 / 4.6 / 4.7): golden parity with transformers' Glm4MoeForCausalLM on the fixture, its config.json
read and written back, the MTP layer kept, and the presets at the released sizes."""

import json

import jax
import numpy as np
import pytest
from helpers.fixture_models import FIX
from safetensors.numpy import load_file

import glm_jax
from glm_jax import GLMConfig

NAME = "transformers-glm4-moe"


def _io():
    return dict(np.load(FIX / NAME / "io.npz"))


def _arange(ids):
    B, T = ids.shape
    return np.broadcast_to(np.arange(T), (B, T))


@pytest.fixture(scope="module")
def lm():
    return glm_jax.from_pretrained(FIX / NAME / "model")


@pytest.mark.parametrize("sub,kw", [("model", {}), ("model_sharded_safetensors", {}), ("model", {"scan_layers": True})])
def test_logits_and_greedy_ids_match_reference(sub, kw):
    """The fixture's logits come from transformers' forward (positions 0..T-1, pads included); its greedy ids from
    generate with the attention mask (positions counting real tokens, our default)."""
    d = _io()
    real = d["attention_mask"] == 1
    m = glm_jax.from_pretrained(FIX / NAME / sub, **kw)
    assert m.config.family == "glm4-moe" and m.config.num_mtp_layers == 1
    logits = np.asarray(m(d["input_ids"], attention_mask=d["attention_mask"], position_ids=_arange(d["input_ids"])))
    assert logits.shape == d["logits"].shape
    assert np.abs(logits - d["logits"])[real].max() <= 1e-4
    new = d["greedy_ids"].shape[1] - d["input_ids"].shape[1]
    out = m.generate(d["input_ids"], attention_mask=d["attention_mask"], max_new_tokens=new)
    np.testing.assert_array_equal(out, d["greedy_ids"])


def test_hidden_states_match_reference(lm):
    d = _io()
    real = d["attention_mask"] == 1
    _, hid = lm.module.apply(
        {"params": lm.params},
        d["input_ids"],
        attention_mask=d["attention_mask"],
        position_ids=_arange(d["input_ids"]),
        return_hidden=True,
    )
    ref = d["hidden_states"]
    for i in range(3):
        assert np.abs(np.asarray(hid["layer_inputs"][i]) - ref[i])[real].max() <= 1e-4, i
    assert np.abs(np.asarray(hid["final"]) - ref[3])[real].max() <= 1e-4


def test_mtp_layer_and_router_bias_are_loaded_as_stored(lm):
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
    assert cfg.position == "rope_neox" and cfg.num_mtp_layers == 1
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


# The model cards: GLM-4.5 355B total / 32B active, GLM-4.5-Air 106B / 12B (without the MTP layer; active = the
# transformer layers a token passes through, embeddings and output layer not counted). The Hugging Face pages
# count every stored tensor, the MTP layer included: 358B and 110B. GLM-4.6 has GLM-4.5's shape.
@pytest.mark.parametrize(
    "preset,total,stored,active",
    [("glm4_5", 355e9, 358e9, 32e9), ("glm4_5_air", 106e9, 110e9, 12e9), ("glm4_6", 355e9, 358e9, 32e9)],
)
def test_presets_have_the_released_sizes(preset, total, stored, active):
    cfg = GLMConfig.preset(preset)
    shapes = glm_jax.param_shapes(cfg)
    n = {k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v)) for k, v in shapes.items()}
    main = sum(v for k, v in n.items() if not k.startswith("mtp_"))
    assert abs(main / total - 1) < 0.01, main
    assert abs(cfg.num_params() / stored - 1) < 0.005, cfg.num_params()
    assert cfg.num_params() == sum(n.values()) and n["mtp_0"] > 0
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    moe_layers = cfg.num_layers - cfg.first_k_dense_replace
    act = main - moe_layers * (cfg.num_experts - cfg.num_experts_per_tok) * per_expert - n["embed"] - n["lm_head"]
    assert abs(act / active - 1) < 0.02, act
    # the model flops glm-train divides by (MFU, compile_only's XLA/model ratio) count these active params + the head
    from train.flops import active_matmul_params

    assert abs(active_matmul_params(cfg) - (act + n["lm_head"])) < 1e-6 * act


def test_bfloat16_load_keeps_the_router_bias_in_float32():
    d = _io()
    m = glm_jax.from_pretrained(FIX / NAME / "model", dtype="bfloat16")
    st = load_file(FIX / NAME / "model" / "model.safetensors")
    bias = m.params["layers_1"]["block"]["moe"]["router"]["score_bias"]
    assert bias.dtype == np.float32
    np.testing.assert_array_equal(bias, st["model.layers.1.mlp.gate.e_score_correction_bias"])
    assert m.params["layers_1"]["block"]["moe"]["experts"]["gate"].dtype == jax.numpy.bfloat16
    logits = np.asarray(m(d["input_ids"], attention_mask=d["attention_mask"], position_ids=_arange(d["input_ids"])))
    real = d["attention_mask"] == 1
    assert np.isfinite(logits).all() and np.abs(logits - d["logits"])[real].max() < 0.1
