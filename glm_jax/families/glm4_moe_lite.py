"""transformers' Glm4MoeLiteForCausalLM (GLM-4.7-Flash): DeepSeek-V2-style multi-head latent attention (MLA) and
GLM-4.5's mixture of experts.

Attention per layer (glm_jax/model/mla.py): the query from `q_proj`, or through a low-rank latent (`q_a_proj`,
`q_a_layernorm`, `q_b_proj`) when `q_lora_rank` is set; `kv_a_proj_with_mqa` gives one kv latent (normed by
`kv_a_layernorm`) and one rotary key shared by every head; `kv_b_proj` expands the latent into each head's
[k_nope | v]. Rotary covers the `qk_rope_head_dim` slice only, interleaved pairs or rotate-half
(`rope_interleave`). In GLMConfig: head_dim = qk_nope_head_dim + qk_rope_head_dim, rope_dim = qk_rope_head_dim,
the rotation style is `position_encoding`.

`mlp_layer_types` says per layer whether the MLP is dense or GLM-4.5's experts. The released checkpoint stores one
MTP layer at index `num_hidden_layers` (transformers ignores it); it loads into `mtp_0/` and exports back bit for
bit, as for glm4-moe, and the number of MTP layers is taken from the keys present.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from glm_jax.errors import ConfigError
from glm_jax.families import glm4_moe
from glm_jax.families.base import Family, eos_ids, eos_out, need_int, number
from glm_jax.families.rows import D, F, Row, V, layer_rows, linear, untied
from glm_jax.hostbuf import c as contiguous

# config.json key -> (GLMConfig field, the config class's default); glm4-moe's router keys plus the MTP count
_MOE_KEYS = {
    "n_routed_experts": ("num_experts", 64),
    "num_experts_per_tok": ("num_experts_per_tok", 4),
    "n_shared_experts": ("n_shared_experts", 1),
    "moe_intermediate_size": ("moe_intermediate_size", 1536),
    "n_group": ("n_group", 1),
    "topk_group": ("topk_group", 1),
}


def recognise(d: dict) -> bool:
    archs = " ".join(d.get("architectures") or [])
    return d.get("model_type") == "glm4_moe_lite" or "Glm4MoeLiteFor" in archs or archs == "Glm4MoeLiteModel"


def rope_theta(d: dict) -> float:
    rp = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if rp.get("rope_type", "default") not in ("default", None):
        # YaRN would change the frequencies and the softmax scale (mscale); neither is implemented
        raise ConfigError(f"rope_type {rp.get('rope_type')!r} is not supported (only 'default')")
    return float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))


def layer_types(d: dict, key: str, allowed: tuple, default: list) -> tuple:
    """A per-layer list of config.json (mlp_layer_types, indexer_types), checked; absent: `default`."""
    v = d.get(key)
    if v is None:
        return tuple(default)
    if not isinstance(v, list) or len(v) != d["num_hidden_layers"] or any(t not in allowed for t in v):
        raise ConfigError(f"{key} must list one of {allowed} per layer ({d['num_hidden_layers']}), got {v!r}")
    return tuple(v)


def from_hf(d: dict, defaults: dict | None = None) -> dict:
    """GLMConfig fields of an MLA config.json; `defaults`: the config class's values for absent keys."""
    dflt = {"qk_nope_head_dim": 192, "qk_rope_head_dim": 64, "v_head_dim": 256, "kv_lora_rank": 512, "q_lora_rank": 768}
    dflt.update(defaults or {})
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act {act!r} is not supported for {d.get('model_type')} (only 'silu')")
    n = d["num_attention_heads"]
    if d.get("num_key_value_heads") not in (None, n):
        raise ConfigError(f"num_key_value_heads {d['num_key_value_heads']} != num_attention_heads {n}: not MLA")
    dn, dr = (
        need_int(d, "qk_nope_head_dim", dflt["qk_nope_head_dim"]),
        need_int(d, "qk_rope_head_dim", dflt["qk_rope_head_dim"]),
    )
    L = d["num_hidden_layers"]
    mlp = layer_types(d, "mlp_layer_types", ("dense", "sparse"), ["dense"] + ["sparse"] * (L - 1))
    q_lora = d.get("q_lora_rank", dflt["q_lora_rank"])
    bias = bool(d.get("attention_bias", False))
    kw = dict(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        num_layers=L,
        num_heads=n,
        num_kv_heads=n,
        head_dim=dn + dr,
        ffn_size=d["intermediate_size"],
        norm="rmsnorm",
        norm_eps=d.get("rms_norm_eps", 1e-5),
        position_encoding="rope_interleaved" if d.get("rope_interleave", True) else "rope_half",
        rope_dim=dr,
        rope_base=rope_theta(d),
        max_position_embeddings=d.get("max_position_embeddings", 202752),
        qkv_bias=bias,  # q_a_proj and kv_a_proj_with_mqa
        out_bias=bias,
        mlp="swiglu",
        mlp_bias=False,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        mask_rule="causal",
        pad_token_id=d.get("pad_token_id"),
        eos_token_id=eos_ids(d),
        attention_kind="mla",
        q_lora_rank=0 if q_lora is None else need_int(d, "q_lora_rank"),
        kv_lora_rank=need_int(d, "kv_lora_rank", dflt["kv_lora_rank"]),
        v_head_dim=need_int(d, "v_head_dim", dflt["v_head_dim"]),
        mlp_layer_types=mlp,
        first_k_dense_replace=next((i for i, t in enumerate(mlp) if t != "dense"), L),
        norm_topk_prob=bool(d.get("norm_topk_prob", True)),
        routed_scaling_factor=float(d.get("routed_scaling_factor", 1.8)),
        num_mtp_layers=need_int(d, "num_nextn_predict_layers", 1),
    )
    for key, (field, default) in _MOE_KEYS.items():
        kw[field] = need_int(d, key, dflt.get(key, default))
    return kw


def to_hf(c) -> dict:
    src = c.hf_config or {}
    out = {
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "intermediate_size": c.ffn_size,
        "rms_norm_eps": c.norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "attention_bias": c.qkv_bias,
        "tie_word_embeddings": c.tie_word_embeddings,
        "q_lora_rank": c.q_lora_rank or None,
        "kv_lora_rank": c.kv_lora_rank,
        "qk_nope_head_dim": c.qk_nope_head_dim,
        "qk_rope_head_dim": c.rope_dim,
        "qk_head_dim": c.head_dim,
        "v_head_dim": c.v_head_dim,
        "mlp_layer_types": list(c.mlp_layer_types),
        "norm_topk_prob": c.norm_topk_prob,
        "routed_scaling_factor": number(c.routed_scaling_factor),
        "rope_parameters": {**(src.get("rope_parameters") or {"rope_type": "default"}), "rope_theta": c.rope_base},
    }
    if "rope_interleave" in src or c.position_encoding != "rope_interleaved" or not c.hf_config:
        out["rope_interleave"] = c.position_encoding == "rope_interleaved"
    out.update({key: getattr(c, field) for key, (field, _) in _MOE_KEYS.items()})
    if "num_nextn_predict_layers" in src or not c.hf_config:  # the class has no such key; the released file does
        out["num_nextn_predict_layers"] = c.num_mtp_layers or src.get("num_nextn_predict_layers", 0)
    return out


def base_hf(c, arch: str = "Glm4MoeLiteForCausalLM", model_type: str = "glm4_moe_lite") -> dict:
    return {
        "architectures": [arch],
        "model_type": model_type,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": 0,
        "eos_token_id": eos_out(c),
        "pad_token_id": c.pad_token_id,
        "output_router_logits": False,
        "use_cache": True,
        "dtype": "bfloat16",
    }


# ---------------------------------------------------------------- key map
def _q_lora(cfg) -> bool:
    return cfg.q_lora_rank > 0


def _q_full(cfg) -> bool:
    return cfg.q_lora_rank == 0


def _q_a_bias(cfg) -> bool:
    return cfg.q_lora_rank > 0 and cfg.qkv_bias


def _qkv_bias(cfg) -> bool:
    return cfg.qkv_bias


def _out_bias(cfg) -> bool:
    return cfg.out_bias


def RQ(cfg):
    return (cfg.q_lora_rank,)


def RKV(cfg):
    return (cfg.kv_lora_rank,)


def QH(cfg):
    return (cfg.num_heads, cfg.head_dim)


def VH(cfg):
    return (cfg.num_heads, cfg.value_head_dim)


def kv_a():
    """kv_a_proj_with_mqa [r_kv + dr, D] <-> the latent's kernel [D, r_kv] and the rotary key's [D, dr]."""

    def to_jax(cfg, a):
        w = a[0]
        r = cfg.kv_lora_rank
        return [contiguous(w[:r].T), contiguous(w[r:].T)]

    def to_hf(cfg, a):
        lat, rot = (np.asarray(x) for x in a)
        return [contiguous(np.concatenate([lat, rot], axis=1).T)]

    return to_jax, to_hf


def kv_a_bias():
    def to_jax(cfg, a):
        r = cfg.kv_lora_rank
        return [contiguous(a[0][:r]), contiguous(a[0][r:])]

    def to_hf(cfg, a):
        return [np.concatenate([np.asarray(x) for x in a])]

    return to_jax, to_hf


def KVB(cfg):
    """kv_b_proj's rows per head: [k_nope (qk_nope_head_dim) | v (v_head_dim)]."""
    return (cfg.num_heads, cfg.qk_nope_head_dim + cfg.value_head_dim)


ATTENTION = [
    ("input_layernorm.weight", "input_norm/scale", None, None),
    ("self_attn.q_proj.weight", "attn/q/kernel", linear(D, QH), _q_full),
    ("self_attn.q_a_proj.weight", "attn/q_a/kernel", linear(D, RQ), _q_lora),
    ("self_attn.q_a_proj.bias", "attn/q_a/bias", None, _q_a_bias),
    ("self_attn.q_a_layernorm.weight", "attn/q_a_norm/scale", None, _q_lora),
    ("self_attn.q_b_proj.weight", "attn/q_b/kernel", linear(RQ, QH), _q_lora),
    ("self_attn.kv_a_proj_with_mqa.weight", ("attn/kv_a/kernel", "attn/k_rope/kernel"), kv_a(), None),
    ("self_attn.kv_a_proj_with_mqa.bias", ("attn/kv_a/bias", "attn/k_rope/bias"), kv_a_bias(), _qkv_bias),
    ("self_attn.kv_a_layernorm.weight", "attn/kv_a_norm/scale", None, None),
    ("self_attn.kv_b_proj.weight", "attn/kv_b/kernel", linear(RKV, KVB), None),
    ("self_attn.o_proj.weight", "attn/o/kernel", linear(VH, D), None),
    ("self_attn.o_proj.bias", "attn/o/bias", None, _out_bias),
    ("post_attention_layernorm.weight", "mlp_norm/scale", None, None),
]
DENSE = [
    ("mlp.gate_proj.weight", "mlp/gate/kernel", linear(D, F), None),
    ("mlp.up_proj.weight", "mlp/up/kernel", linear(D, F), None),
    ("mlp.down_proj.weight", "mlp/down/kernel", linear(F, D), None),
]


def _rows(jax_prefix, names, layers):
    return [dataclasses.replace(r, layers=layers) for r in layer_rows("model.layers.{l}.", jax_prefix, names)]


def _main(cfg):
    return range(cfg.num_layers)


def _dense_layers(cfg):
    return [i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)]


def _moe_layers(cfg):
    return [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]


def _mtp_layers(cfg):
    return range(cfg.num_layers, cfg.num_layers + cfg.num_mtp_layers)


def rows(attention) -> tuple:
    """The whole key map for MLA layers whose attention rows are `attention` (glm-moe-dsa adds its indexer)."""
    return (
        Row(("model.embed_tokens.weight",), ("embed/embedding",)),
        *_rows("layers_{l}/block/", attention, _main),
        *_rows("layers_{l}/block/", DENSE, _dense_layers),
        *_rows("layers_{l}/block/", glm4_moe.MOE, _moe_layers),
        *_rows("mtp_{m}/", glm4_moe.MTP, _mtp_layers),
        *_rows("mtp_{m}/block/", attention + glm4_moe.MOE, _mtp_layers),
        Row(("model.norm.weight",), ("final_norm/scale",)),
        Row(("lm_head.weight",), ("lm_head/kernel",), *linear(D, V), when=untied),
    )


ROWS = rows(ATTENTION)

PRESETS = {  # zai-org/GLM-4.7-Flash: transformers' Glm4MoeLiteConfig defaults, with its MTP layer
    "glm4_7_flash": dict(
        architectures=["Glm4MoeLiteForCausalLM"],
        model_type="glm4_moe_lite",
        attention_bias=False,
        attention_dropout=0.0,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
        hidden_act="silu",
        hidden_size=2048,
        initializer_range=0.02,
        intermediate_size=10240,
        kv_lora_rank=512,
        max_position_embeddings=202752,
        mlp_layer_types=["dense"] + ["sparse"] * 46,
        moe_intermediate_size=1536,
        n_group=1,
        n_routed_experts=64,
        n_shared_experts=1,
        norm_topk_prob=True,
        num_attention_heads=20,
        num_experts_per_tok=4,
        num_hidden_layers=47,
        num_key_value_heads=20,
        num_nextn_predict_layers=1,
        q_lora_rank=768,
        qk_head_dim=256,
        qk_nope_head_dim=192,
        qk_rope_head_dim=64,
        rms_norm_eps=1e-05,
        rope_interleave=True,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        routed_scaling_factor=1.8,
        tie_word_embeddings=False,
        topk_group=1,
        use_cache=True,
        v_head_dim=256,
        vocab_size=154880,
        dtype="bfloat16",
    )
}

FAMILY = Family(
    id="glm4-moe-lite",
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
