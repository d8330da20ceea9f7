"""transformers' Glm4ForCausalLM (GLM-4-0414, GLM-Z1): glm-hf plus a norm after attention and after the MLP
(sandwich norms). Recognised by model_type "glm4"; reads, writes and maps keys with glm_hf's functions."""

from __future__ import annotations

from glm_jax.families import glm_hf
from glm_jax.families.base import Family
from glm_jax.families.chatglm2 import GLM4_TOKENIZER


def recognise(d: dict) -> bool:
    archs = " ".join(d.get("architectures") or [])
    return d.get("model_type") == "glm4" or "Glm4For" in archs or archs == "Glm4Model"


def from_hf(d: dict) -> dict:
    return glm_hf.from_hf(d, sandwich=True)


def base_hf(c) -> dict:
    return glm_hf.base_hf(c, "Glm4ForCausalLM", "glm4")


PRESETS = {
    "glm4_9b_0414": dict(
        architectures=["Glm4ForCausalLM"],
        model_type="glm4",
        attention_bias=True,
        attention_dropout=0.0,
        eos_token_id=[151329, 151336, 151338],
        head_dim=128,
        hidden_act="silu",
        hidden_size=4096,
        initializer_range=0.02,
        intermediate_size=13696,
        max_position_embeddings=32768,
        num_attention_heads=32,
        num_hidden_layers=40,
        num_key_value_heads=2,
        pad_token_id=151329,
        partial_rotary_factor=0.5,
        rms_norm_eps=1e-05,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        use_cache=True,
        vocab_size=151552,
        dtype="bfloat16",
    ),
}

FAMILY = Family(
    id="glm4",
    recognise=recognise,
    from_hf=from_hf,
    to_hf=glm_hf.to_hf,
    base_hf=base_hf,
    rows=glm_hf.ROWS,
    presets=PRESETS,
    dtype_key="dtype",
    tokenizers=(GLM4_TOKENIZER,),  # the GLM-4 chat format, as its remote-code checkpoints ship it
)
