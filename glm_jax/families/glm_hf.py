"""transformers' GlmForCausalLM (glm-4-9b-chat-hf): the GLM-4 math of the chatglm2 family with separate
q/k/v/o projections and a fused `gate_up_proj`. Recognised by model_type "glm" with a `GlmFor...` architecture.
Glm4ForCausalLM (glm4.py) adds sandwich norms and reuses this module's reader, writer and key map.
"""

from __future__ import annotations

from glm_jax.errors import ConfigError
from glm_jax.families.base import Family, eos_ids, eos_out
from glm_jax.families.chatglm2 import GLM4_TOKENIZER
from glm_jax.families.rows import HF_ATTENTION, D, F, Row, V, gate_up, layer_rows, linear, untied


def recognise(d: dict) -> bool:
    archs = " ".join(d.get("architectures") or [])
    return d.get("model_type") == "glm" or "GlmFor" in archs or archs == "GlmModel"


def rope_theta_and_factor(d: dict):
    """Glm/Glm4 write rope settings either at the top level (transformers < 5) or in rope_parameters (5.x)."""
    rp = d.get("rope_parameters") or d.get("rope_scaling") or {}
    theta = rp.get("rope_theta", d.get("rope_theta", 10000.0))
    factor = rp.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.5))
    if rp.get("rope_type", "default") not in ("default", None):
        raise ConfigError(f"rope_type {rp.get('rope_type')!r} is not supported (only 'default')")
    return float(theta), float(factor)


def from_hf(d: dict, sandwich: bool = False) -> dict:
    n = d["num_attention_heads"]
    hd = d["head_dim"] if d.get("head_dim") is not None else d["hidden_size"] // n  # 0 stays 0 (refused)
    theta, factor = rope_theta_and_factor(d)
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act {act!r} is not supported for {d.get('model_type')} (only 'silu')")
    return dict(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=n,
        num_kv_heads=d["num_key_value_heads"] if d.get("num_key_value_heads") is not None else n,
        head_dim=hd,
        ffn_size=d["intermediate_size"],
        norm="rmsnorm",
        norm_eps=d.get("rms_norm_eps", 1.5625e-07),
        sandwich_norm=sandwich,
        position_encoding="rope_interleaved",
        rope_dim=int(hd * factor),
        rope_base=theta,
        max_position_embeddings=d.get("max_position_embeddings", 131072),
        qkv_bias=bool(d.get("attention_bias", True)),
        out_bias=False,
        mlp="swiglu",
        mlp_bias=False,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        mask_rule="causal",
        position_rule="sequential",
        pad_token_id=d.get("pad_token_id"),
        eos_token_id=eos_ids(d),
    )


def to_hf(c) -> dict:
    out = {
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "intermediate_size": c.ffn_size,
        "rms_norm_eps": c.norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "attention_bias": c.qkv_bias,
        "tie_word_embeddings": c.tie_word_embeddings,
    }
    src = c.hf_config or {}
    rope = {"rope_theta": c.rope_base, "partial_rotary_factor": c.rope_dim / c.head_dim}
    if "rope_parameters" in src:
        out["rope_parameters"] = {**src["rope_parameters"], **rope}
    else:
        out.update(rope)
    return out


def base_hf(c, arch: str = "GlmForCausalLM", model_type: str = "glm") -> dict:
    return {
        "architectures": [arch],
        "model_type": model_type,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "eos_token_id": eos_out(c),
        "pad_token_id": c.pad_token_id,
        "use_cache": True,
        "dtype": "bfloat16",
    }


def _sandwich(cfg) -> bool:
    return cfg.sandwich_norm


ROWS = (
    Row(("model.embed_tokens.weight",), ("embed/embedding",)),
    *layer_rows(
        "model.layers.{l}.",
        "layers_{l}/block/",
        [
            *HF_ATTENTION,
            ("post_self_attn_layernorm.weight", "post_attn_norm/scale", None, _sandwich),
            ("post_attention_layernorm.weight", "mlp_norm/scale", None, None),
            ("mlp.gate_up_proj.weight", ("mlp/gate/kernel", "mlp/up/kernel"), gate_up(), None),
            ("mlp.down_proj.weight", "mlp/down/kernel", linear(F, D), None),
            ("post_mlp_layernorm.weight", "post_mlp_norm/scale", None, _sandwich),
        ],
    ),
    Row(("model.norm.weight",), ("final_norm/scale",)),
    Row(("lm_head.weight",), ("lm_head/kernel",), *linear(D, V), when=untied),
)

FAMILY = Family(
    id="glm-hf",
    recognise=recognise,
    from_hf=from_hf,
    to_hf=to_hf,
    base_hf=base_hf,
    rows=ROWS,
    dtype_key="dtype",
    tokenizers=(GLM4_TOKENIZER,),  # the GLM-4 chat format, as its remote-code checkpoints ship it
)
