"""transformers' GlmMoeDsaForCausalLM (GLM-5): glm4-moe-lite's MLA (always with the query latent, rotary always
interleaved) plus DeepSeek sparse attention: each query attends only to the `index_topk` keys that a small
indexer scores highest (glm_jax/model/indexer.py).

The indexer of layer i (`self_attn.indexer.*`: `wq_b` on the query latent, `wk` and the LayerNorm `k_norm` for its
one key head, `weights_proj` for the per-head weights) exists only where `indexer_types[i]` is "full"; a "shared"
layer reuses the choice of the last full layer before it. The MTP layer stored at index `num_hidden_layers` has
its own indexer.
"""

from __future__ import annotations

from glm_jax.errors import ConfigError
from glm_jax.families import glm4_moe, glm4_moe_lite
from glm_jax.families.base import Family, need_int
from glm_jax.families.rows import D, linear

_DEFAULTS = {  # GlmMoeDsaConfig's values for absent keys, where they differ from Glm4MoeLiteConfig's
    "q_lora_rank": 2048,
    "n_routed_experts": 256,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 2048,
}


def recognise(d: dict) -> bool:
    archs = " ".join(d.get("architectures") or [])
    return d.get("model_type") == "glm_moe_dsa" or "GlmMoeDsaFor" in archs or archs == "GlmMoeDsaModel"


def _indexer_types(d: dict) -> list:
    """GlmMoeDsaConfig's rule when config.json has no indexer_types: index_topk_pattern ("F"/"S" letters or a
    list), else every index_topk_freq-th layer from index_skip_topk_offset runs its own indexer."""
    pattern = d.get("index_topk_pattern")
    if pattern is not None:
        return [{"F": "full", "S": "shared"}[ch] for ch in pattern] if isinstance(pattern, str) else list(pattern)
    freq = max(d.get("index_topk_freq", 1), 1)
    offset = d.get("index_skip_topk_offset", 2)
    return ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(d["num_hidden_layers"])]


def from_hf(d: dict) -> dict:
    L = d["num_hidden_layers"]
    if d.get("mlp_layer_types") is None:
        k = min(need_int(d, "first_k_dense_replace", 3), L)
        d = {**d, "mlp_layer_types": ["dense"] * k + ["sparse"] * (L - k)}
    if d.get("rope_interleave") is False:
        raise ConfigError("glm_moe_dsa rotates interleaved pairs always; rope_interleave=false is not its layout")
    if d.get("mlp_bias"):
        raise ConfigError("mlp_bias=true is not supported for glm_moe_dsa")
    kw = glm4_moe_lite.from_hf({**d, "rope_interleave": True}, _DEFAULTS)
    if not kw["q_lora_rank"]:
        raise ConfigError("glm_moe_dsa needs q_lora_rank (its indexer reads the query latent)")
    kw.update(
        first_k_dense_replace=need_int(d, "first_k_dense_replace", 3),
        index_topk=need_int(d, "index_topk", 2048),
        index_n_heads=need_int(d, "index_n_heads", 32),
        index_head_dim=need_int(d, "index_head_dim", 128),
        indexer_types=glm4_moe_lite.layer_types(d, "indexer_types", ("full", "shared"), _indexer_types(d)),
        routed_scaling_factor=float(d.get("routed_scaling_factor", 2.5)),
    )
    return kw


def to_hf(c) -> dict:
    out = glm4_moe_lite.to_hf(c)
    out.pop("rope_interleave", None)
    out.update(
        head_dim=c.rope_dim,  # GlmMoeDsaConfig sets head_dim to qk_rope_head_dim (its rotary width)
        first_k_dense_replace=c.first_k_dense_replace,
        index_topk=c.index_topk,
        index_n_heads=c.index_n_heads,
        index_head_dim=c.index_head_dim,
        indexer_types=list(c.indexer_types),
        mlp_bias=False,
    )
    return out


def base_hf(c) -> dict:
    return {
        **glm4_moe_lite.base_hf(c, "GlmMoeDsaForCausalLM", "glm_moe_dsa"),
        "layer_types": ["indexed_attention"] * c.num_layers,
    }


# ---------------------------------------------------------------- key map
def IQ(cfg):
    return (cfg.index_n_heads, cfg.index_head_dim)


def RQ(cfg):
    return (cfg.q_lora_rank,)


def ID(cfg):
    return (cfg.index_head_dim,)


def IH(cfg):
    return (cfg.index_n_heads,)


INDEXER = [
    ("self_attn.indexer.wq_b.weight", "attn/indexer/wq_b/kernel", linear(RQ, IQ), None),
    ("self_attn.indexer.wk.weight", "attn/indexer/wk/kernel", linear(D, ID), None),
    ("self_attn.indexer.k_norm.weight", "attn/indexer/k_norm/scale", None, None),
    ("self_attn.indexer.k_norm.bias", "attn/indexer/k_norm/bias", None, None),
    ("self_attn.indexer.weights_proj.weight", "attn/indexer/weights_proj/kernel", linear(D, IH), None),
]


def _indexed_layers(cfg):
    return [i for i in range(cfg.num_layers) if cfg.has_indexer(i)]


ROWS = (
    *glm4_moe_lite.ROWS,
    *glm4_moe_lite._rows("layers_{l}/block/", INDEXER, _indexed_layers),
    *glm4_moe_lite._rows("mtp_{m}/block/", INDEXER, glm4_moe_lite._mtp_layers),  # the MTP layer has its own
)

PRESETS = {  # zai-org/GLM-5: transformers' GlmMoeDsaConfig defaults, with its MTP layer
    "glm5": dict(
        architectures=["GlmMoeDsaForCausalLM"],
        model_type="glm_moe_dsa",
        attention_bias=False,
        attention_dropout=0.0,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
        first_k_dense_replace=3,
        head_dim=64,
        hidden_act="silu",
        hidden_size=6144,
        index_head_dim=128,
        index_n_heads=32,
        index_topk=2048,
        indexer_types=["full"] * 78,
        initializer_range=0.02,
        intermediate_size=12288,
        kv_lora_rank=512,
        layer_types=["indexed_attention"] * 78,
        max_position_embeddings=202752,
        mlp_bias=False,
        mlp_layer_types=["dense"] * 3 + ["sparse"] * 75,
        moe_intermediate_size=2048,
        n_group=1,
        n_routed_experts=256,
        n_shared_experts=1,
        norm_topk_prob=True,
        num_attention_heads=64,
        num_experts_per_tok=8,
        num_hidden_layers=78,
        num_key_value_heads=64,
        num_nextn_predict_layers=1,
        q_lora_rank=2048,
        qk_head_dim=256,
        qk_nope_head_dim=192,
        qk_rope_head_dim=64,
        rms_norm_eps=1e-05,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        routed_scaling_factor=2.5,
        tie_word_embeddings=False,
        topk_group=1,
        use_cache=True,
        v_head_dim=256,
        vocab_size=154880,
        dtype="bfloat16",
    )
}

FAMILY = Family(
    id="glm-moe-dsa",
    recognise=recognise,
    from_hf=from_hf,
    to_hf=to_hf,
    base_hf=base_hf,
    rows=ROWS,
    presets=PRESETS,
    dtype_key="dtype",
    tokenizers=glm4_moe.FAMILY.tokenizers,  # GLM-4.5's tokenizer.json and chat format (the glm4.7 template variant)
    fit_to_checkpoint=glm4_moe.fit_to_checkpoint,
)
