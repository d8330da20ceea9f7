"""GLM-4.7-Flash (glm4-moe-lite) and GLM-5 (glm-moe-dsa): golden parity with transformers' Glm4MoeLiteForCausalLM and
GlmMoeDsaForCausalLM on their fixtures (logits, hidden states, greedy ids from the latent cache), the DSA indexer's
choice against a numpy transcription of transformers' indexer, config.json read and written back, the presets at
the released sizes and the decode cache they allocate."""

import json

import jax
import numpy as np
import pytest
from helpers.fixture_models import FIX
from safetensors.numpy import load_file

import glm_jax
from glm_jax import GLMConfig
from glm_jax.checkpoint import layout

LITE, DSA = "transformers-glm4-moe-lite", "transformers-glm-moe-dsa"


def _io(name):
    return dict(np.load(FIX / name / "io.npz"))


def _arange(ids):
    B, T = ids.shape
    return np.broadcast_to(np.arange(T), (B, T))


@pytest.mark.parametrize("name", [LITE, DSA])
@pytest.mark.parametrize("sub", ["model", "model_sharded_safetensors"])
@pytest.mark.parametrize("scan", [False, True])
def test_logits_and_greedy_ids_match_reference(name, sub, scan):
    """Logits from transformers' forward (positions 0..T-1, pads included) to 1e-4 at real tokens; greedy ids
    from its generate (our default positions count the real tokens), decoded from the latent cache."""
    d = _io(name)
    real = d["attention_mask"] == 1
    m = glm_jax.from_pretrained(FIX / name / sub, scan_layers=scan)
    c = m.config
    assert c.mla and c.num_mtp_layers == 1 and c.mlp_layer_types == ("dense", "sparse", "sparse")
    logits = np.asarray(m(d["input_ids"], attention_mask=d["attention_mask"], position_ids=_arange(d["input_ids"])))
    assert logits.shape == d["logits"].shape
    assert np.abs(logits - d["logits"])[real].max() <= 1e-4
    new = d["greedy_ids"].shape[1] - d["input_ids"].shape[1]
    out = m.generate(d["input_ids"], attention_mask=d["attention_mask"], max_new_tokens=new)
    np.testing.assert_array_equal(out, d["greedy_ids"])


@pytest.mark.parametrize("name", [LITE, DSA])
@pytest.mark.parametrize("attention", ["xla", "flash"])  # flash: MLA takes the default mask densely (no kernel yet)
def test_hidden_states_match_reference(name, attention):
    d = _io(name)
    lm = glm_jax.from_pretrained(FIX / name / "model", attention=attention)
    real = d["attention_mask"] == 1
    _, hid = lm.module.apply(
        {"params": lm.params},
        d["input_ids"],
        attention_mask=d["attention_mask"],
        position_ids=_arange(d["input_ids"]),
        method="with_hidden",
    )
    ref = d["hidden_states"]
    for i in range(3):
        assert np.abs(np.asarray(hid.layer_inputs[i]) - ref[i])[real].max() <= 1e-4, i
    assert np.abs(np.asarray(hid.final) - ref[3])[real].max() <= 1e-4


def test_dsa_sparse_choice_matters():
    """With every visible key kept (index_topk >= T: dense MLA) the logits move by about 0.24 (the fixture's
    MANIFEST); with index_topk = 6 they are the reference's."""
    d = _io(DSA)
    real = d["attention_mask"] == 1
    lm = glm_jax.from_pretrained(FIX / DSA / "model")
    dense = glm_jax.from_pretrained(FIX / DSA / "model", index_topk=d["input_ids"].shape[1])
    pos = _arange(d["input_ids"])
    sparse_l = np.asarray(lm(d["input_ids"], attention_mask=d["attention_mask"], position_ids=pos))
    dense_l = np.asarray(dense(d["input_ids"], attention_mask=d["attention_mask"], position_ids=pos))
    assert np.abs(sparse_l - d["logits"])[real].max() <= 1e-4
    gap = np.abs(dense_l - d["logits"])[real].max()
    assert 0.2 < gap < 0.3, gap


# ---------------------------------------------------------------- the indexer, transcribed from transformers
def _rms(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps))


def _layernorm(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _rope_interleave(x, pos, theta, dr):
    """transformers' apply_rotary_pos_emb_interleave on the first dr dims ([..., dr] rotated, output in its
    de-interleaved order), the rest passed through; x [B, T, heads, d]."""
    inv = 1.0 / (theta ** (np.arange(0, dr, 2, dtype=np.float32) / dr))
    ang = pos[..., None].astype(np.float32) * inv  # [B, T, dr/2]
    cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
    r, rest = x[..., :dr], x[..., dr:]
    x1, x2 = r[..., 0::2], r[..., 1::2]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], -1)


def _numpy_topk(st, cfg, layer, h, mask, pos):
    """GlmMoeDsaIndexer.forward (plus the causal + padding mask it is given) in numpy float64; returns the
    scores [B, T, S] with -inf where hidden."""
    p = f"model.layers.{layer}."
    x = _rms(h, st[p + "input_layernorm.weight"], cfg["rms_norm_eps"])
    q_lat = _rms(x @ st[p + "self_attn.q_a_proj.weight"].T, st[p + "self_attn.q_a_layernorm.weight"], 1e-6)
    B, T, _ = x.shape
    Hi, di, dr = cfg["index_n_heads"], cfg["index_head_dim"], cfg["qk_rope_head_dim"]
    theta = cfg["rope_parameters"]["rope_theta"]
    q = (q_lat @ st[p + "self_attn.indexer.wq_b.weight"].T).reshape(B, T, Hi, di)
    k = x @ st[p + "self_attn.indexer.wk.weight"].T
    k = _layernorm(k, st[p + "self_attn.indexer.k_norm.weight"], st[p + "self_attn.indexer.k_norm.bias"])
    q = _rope_interleave(q, pos, theta, dr)
    k = _rope_interleave(k[:, :, None], pos, theta, dr)[:, :, 0]
    s = np.maximum(np.einsum("bthd,bsd->bhts", q, k) * di**-0.5, 0)
    w = (x @ st[p + "self_attn.indexer.weights_proj.weight"].T) * Hi**-0.5  # [B, T, Hi]
    scores = np.einsum("bth,bhts->bts", w, s)
    allowed = np.tril(np.ones((T, T), bool))[None] & (mask[:, None, :] == 1)
    return np.where(allowed, scores, -np.inf)


@pytest.mark.parametrize("layer", [0, 2])  # the two "full" layers (layer 1 shares layer 0's choice)
def test_indexer_topk_equals_numpy_transcription(layer):
    from glm_jax.model.indexer import Indexer

    d = _io(DSA)
    st = {k: v.astype(np.float64) for k, v in load_file(FIX / DSA / "model" / "model.safetensors").items()}
    hf = json.loads((FIX / DSA / "model" / "config.json").read_text())
    lm = glm_jax.from_pretrained(FIX / DSA / "model")
    c = lm.config
    h = d["hidden_states"][layer].astype(np.float64)  # the layer's input, from the reference
    pos, mask = _arange(d["input_ids"]), d["attention_mask"]
    want = _numpy_topk(st, hf, layer, h, mask, pos)

    p = f"model.layers.{layer}."
    x = _rms(h, st[p + "input_layernorm.weight"], c.norm_eps)
    q_lat = _rms(x @ st[p + "self_attn.q_a_proj.weight"].T, st[p + "self_attn.q_a_layernorm.weight"], 1e-6)
    allowed = np.tril(np.ones((12, 12), bool))[None] & (mask[:, None, :] == 1)
    params = lm.params[f"layers_{layer}"]["block"]["attn"]["indexer"]
    got, _ = Indexer(c).apply(
        {"params": params}, x.astype(np.float32), q_lat.astype(np.float32), pos, jax.numpy.asarray(allowed)
    )
    got = np.asarray(got)
    k = c.index_topk
    checked = 0
    for b in range(2):
        for t in range(12):
            vis = int(allowed[b, t].sum())
            if vis == 0:
                continue
            mine = set(np.asarray(jax.lax.top_k(got[b, t], k)[1]).tolist()) & set(np.flatnonzero(allowed[b, t]))
            ref = set(np.argsort(-want[b, t], kind="stable")[: min(k, vis)].tolist())
            assert mine == ref, (b, t)
            checked += vis > k
    assert checked >= 5  # queries where the choice drops keys
    fin = np.isfinite(want)
    assert np.abs(got[fin] - want[fin]).max() <= 1e-5 * max(1.0, np.abs(want[fin]).max())


# ---------------------------------------------------------------- configs, presets, layout
@pytest.mark.parametrize("name,family", [(LITE, "glm4-moe-lite"), (DSA, "glm-moe-dsa")])
def test_config_json_round_trip(name, family):
    d = json.loads((FIX / name / "model" / "config.json").read_text())
    cfg = GLMConfig.from_hf(d)
    assert cfg.family == family and cfg.attention_kind == "mla"
    assert (cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.rope_dim, cfg.v_head_dim) == (
        48,
        32,
        24,
        16,
        32,
    )
    assert cfg.head_dim == 40 and cfg.position_encoding == "rope_interleaved" and cfg.rope_base == 1e6
    assert [cfg.is_moe_layer(i) for i in range(4)] == [False, True, True, True]  # the MTP layer is MoE
    assert cfg.to_hf() == d
    assert GLMConfig.from_hf(cfg.replace(hf_config=None).to_hf()) == cfg
    if family == "glm-moe-dsa":
        assert (cfg.index_topk, cfg.index_n_heads, cfg.index_head_dim) == (6, 4, 32)
        assert cfg.indexer_types == ("full", "shared", "full")
        assert [cfg.has_indexer(i) for i in range(4)] == [True, False, True, True]
        assert [s.name for s in layout.stacks(cfg)] == ["layers_from_0", "layers_from_1", "layers_from_2"]
    else:
        assert [s.name for s in layout.stacks(cfg)] == ["dense_layers", "layers"]
        lite = GLMConfig.from_hf(dict(d, rope_interleave=False, q_lora_rank=None))
        assert lite.position_encoding == "rope_half" and lite.q_lora_rank == 0 and lite.to_hf()["q_lora_rank"] is None


def test_mlp_layer_types_decide_the_layers_and_the_stacks():
    d = json.loads((FIX / LITE / "model" / "config.json").read_text())
    cfg = GLMConfig.from_hf(dict(d, mlp_layer_types=["sparse", "dense", "sparse"]))
    assert [cfg.is_moe_layer(i) for i in range(3)] == [True, False, True]
    assert [(s.start, s.stop) for s in layout.stacks(cfg)] == [(0, 1), (1, 2), (2, 3)]
    shapes = glm_jax.param_shapes(cfg)
    assert "moe" in shapes["layers_0"]["block"] and "mlp" in shapes["layers_1"]["block"]
    with pytest.raises(glm_jax.ConfigError, match="mlp_layer_types"):
        GLMConfig.from_hf(dict(d, mlp_layer_types=["dense", "sparse"]))
    with pytest.raises(glm_jax.ConfigError, match="rope_type"):
        GLMConfig.from_hf(dict(d, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}))


# The model cards: GLM-4.7-Flash 30B total / 3B active ("30B-A3B"), GLM-5 744B total / 40B active, both without
# the MTP layer; active = the transformer layers a token passes through, embeddings and output layer not counted.
@pytest.mark.parametrize("preset,total,active", [("glm4_7_flash", 30e9, 3.2e9), ("glm5", 744e9, 40e9)])
def test_presets_have_the_released_sizes(preset, total, active):
    cfg = GLMConfig.preset(preset)
    shapes = glm_jax.param_shapes(cfg)
    n = {k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v)) for k, v in shapes.items()}
    main = sum(v for k, v in n.items() if not k.startswith("mtp_"))
    assert abs(main / total - 1) < 0.01, main
    assert n["mtp_0"] > 0 and cfg.num_mtp_layers == 1
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    act = main - moe_layers * (cfg.num_experts - cfg.num_experts_per_tok) * per_expert - n["embed"] - n["lm_head"]
    assert abs(act / active - 1) < 0.03, act


def test_cache_shapes_hold_only_the_latents():
    """GLM-4.7-Flash: 47 layers x (512 latent + 64 rotary key) = 576 numbers a token and layer, not 20 heads x
    (256 + 256) keys and values; GLM-5 adds its 128-wide indexer key on each layer with its own indexer."""
    B, S = 2, 1024
    flash = glm_jax.cache_shapes(GLMConfig.preset("glm4_7_flash"), B, S)
    leaves = jax.tree.leaves(flash)
    assert len(leaves) == 2 * 47 and all(x.dtype == jax.numpy.bfloat16 for x in leaves)
    assert sum(int(np.prod(x.shape)) for x in leaves) == 47 * 576 * B * S
    assert {x.shape for x in flash["latent"]} == {(B, S, 512)} and {x.shape for x in flash["k_rope"]} == {(B, S, 64)}
    g5 = GLMConfig.preset("glm5")
    five = glm_jax.cache_shapes(g5, B, S, dtype="float32")
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(five)) == 78 * (512 + 64 + 128) * B * S
    d = json.loads((FIX / DSA / "model" / "config.json").read_text())
    tiny = glm_jax.cache_shapes(GLMConfig.from_hf(d), 1, 8)
    assert [x.shape for x in tiny["index_k"]] == [(1, 8, 32), (1, 0, 32), (1, 8, 32)]  # the shared layer keeps none


def test_absorbed_decode_equals_the_expanded_form():
    """The latent-space attention (decode) against the per-head expansion (training), float32, random inputs."""
    from glm_jax.model.mla import absorbed, expanded

    rng = np.random.default_rng(0)
    B, T, S, N, R, C, P, E = 2, 3, 9, 4, 32, 24, 16, 20
    q = rng.standard_normal((B, T, N, C + P)).astype(np.float32)
    lat = rng.standard_normal((B, S, R)).astype(np.float32)
    rot = rng.standard_normal((B, S, P)).astype(np.float32)
    w = (0.2 * rng.standard_normal((R, N, C + E))).astype(np.float32)
    allowed = rng.random((B, T, S)) < 0.7
    allowed[..., 0] = True
    a = np.asarray(absorbed(q, lat, rot, w, allowed, C, jax.numpy.float32))
    e = np.asarray(expanded(q, lat, rot, w, allowed, C, jax.numpy.float32))
    assert a.shape == (B, T, N, E)
    assert np.abs(a - e).max() <= 1e-5 * max(1.0, np.abs(e).max())
