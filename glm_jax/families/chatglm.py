"""ChatGLM-6B (v1; HF remote code `modeling_chatglm` with `position_encoding_2d`).

2-D rotary positions (rotate-half on two halves of the head, float16-rounded frequencies), post-LN residuals
with alpha = sqrt(2*28), fused qkv rows grouped per head [q_h|k_h|v_h], GELU (tanh), lm_head tied to the word
embeddings at load time. Default mask: the context up to the first <sop> is bidirectional. The checkpoint saves
each layer's rotary inv_freq and, tied, a copy of the embeddings as lm_head.weight.
"""

from __future__ import annotations

import math

from glm_jax.errors import ConfigError
from glm_jax.families.base import Family, TokenizerFormat, eos_ids, eos_out, is_chatglm_remote
from glm_jax.families.rows import PREFIX_ROWS, D, Row, V, linear, megatron_layer_rows, qkv_per_head, untied
from glm_jax.quant.rows import bits_from_hf, bits_to_hf

AUTO_MAP = {
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
}


def recognise(d: dict) -> bool:
    """Checked after chatglm2, which shares the remote-code names."""
    if not is_chatglm_remote(d):
        return False
    if "position_encoding_2d" in d or "inner_hidden_size" in d:
        return True
    raise ConfigError(
        "model_type chatglm, but neither multi_query_group_num (ChatGLM2+) "
        "nor position_encoding_2d (ChatGLM-6B) is present"
    )


def from_hf(d: dict) -> dict:
    h, n = d["hidden_size"], d["num_attention_heads"]
    two_d = d.get("position_encoding_2d", True)
    return dict(
        vocab_size=d["vocab_size"],
        hidden_size=h,
        num_layers=d["num_layers"],
        num_heads=n,
        num_kv_heads=n,
        head_dim=h // n,
        ffn_size=d["inner_hidden_size"] if d.get("inner_hidden_size") is not None else 4 * h,
        norm="layernorm",
        norm_eps=d.get("layernorm_epsilon", 1e-5),
        residual_from_norm=True,
        residual_alpha=math.sqrt(2 * 28),
        position_encoding="rope_2d" if two_d else "rope_half",
        rope_dim=(h // n) // 2 if two_d else h // n,
        rope_fp16_freqs=True,
        max_position_embeddings=d.get("max_sequence_length", 2048),
        qkv_bias=True,
        qkv_per_head=True,
        out_bias=True,
        mlp="gelu_tanh",
        mlp_bias=True,
        tie_word_embeddings=d.get("tie_word_embeddings", True),
        mask_rule="prefix_until_sop",
        position_rule="at_mask_2d" if two_d else "at_mask_1d",
        bos_token_id=d.get("bos_token_id"),
        mask_token_id=d.get("mask_token_id"),
        gmask_token_id=d.get("gmask_token_id"),
        pad_token_id=d.get("pad_token_id"),
        eos_token_id=eos_ids(d),
        pre_seq_len=d.get("pre_seq_len") or 0,
        prefix_projection=bool(d.get("prefix_projection", False)),
        quantization_bit=bits_from_hf(d),
        prefix_hidden_size=h,
        prefix_embed_size=h,
    )


def to_hf(c) -> dict:
    return {
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "inner_hidden_size": c.ffn_size,
        "layernorm_epsilon": c.norm_eps,
        "max_sequence_length": c.max_position_embeddings,
        "position_encoding_2d": c.position_encoding == "rope_2d",
        "pre_seq_len": c.pre_seq_len or None,
        "prefix_projection": c.prefix_projection,
        "quantization_bit": bits_to_hf(c),
    }


def base_hf(c) -> dict:
    return {
        "architectures": ["ChatGLMModel"],
        "model_type": "chatglm",
        "auto_map": dict(AUTO_MAP),
        "bos_token_id": c.bos_token_id,
        "eos_token_id": eos_out(c),
        "mask_token_id": c.mask_token_id,
        "gmask_token_id": c.gmask_token_id,
        "pad_token_id": c.pad_token_id,
        "use_cache": True,
        "quantization_bit": 0,
        "torch_dtype": "float16",
    }


def buffers(cfg, dtype: str) -> list:
    """Each layer's rotary inv_freq, float16-rounded then cast to the weights' dtype, and the tied lm_head."""
    import torch

    from glm_jax.dtypes import torch_dtype, torch_to_numpy

    dim = cfg.rope_dim
    inv = (1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))).half().to(torch_dtype(dtype))
    out = [
        (
            f"transformer.layers.{layer}.attention.rotary_emb.inv_freq",
            f"transformer.layers.{layer}.input_layernorm.bias",
            torch_to_numpy(inv),
        )
        for layer in range(cfg.num_layers)
    ]
    if cfg.tie_word_embeddings:
        out.append(("lm_head.weight", None, ("alias", "transformer.word_embeddings.weight")))
    return out


ROWS = (
    Row(("transformer.word_embeddings.weight",), ("embed/embedding",)),
    *megatron_layer_rows("transformer.layers.{l}.", qkv_per_head()),
    Row(("transformer.final_layernorm.weight",), ("final_norm/scale",)),
    Row(("transformer.final_layernorm.bias",), ("final_norm/bias",)),
    # from_pretrained ties lm_head to the word embeddings: with tying, the saved lm_head is not a parameter (the
    # loader reads it only to check it exists); without tying it is its own matrix.
    Row(("lm_head.weight",), ("lm_head/kernel",), *linear(D, V), when=untied),
    *PREFIX_ROWS,
)

PRESETS = {
    "chatglm_6b": dict(
        architectures=["ChatGLMModel"],
        model_type="chatglm",
        auto_map=dict(AUTO_MAP),
        bos_token_id=130004,
        eos_token_id=130005,
        mask_token_id=130000,
        gmask_token_id=130001,
        pad_token_id=3,
        hidden_size=4096,
        inner_hidden_size=16384,
        layernorm_epsilon=1e-05,
        max_sequence_length=2048,
        num_attention_heads=32,
        num_layers=28,
        position_encoding_2d=True,
        quantization_bit=0,
        pre_seq_len=None,
        prefix_projection=False,
        use_cache=True,
        vocab_size=130528,
        torch_dtype="float16",
    ),
}


def _tokenizer(vocab_file: str, folder: str, tokenizer_config: dict, **kwargs):
    from glm_jax.tokenizers.chatglm import ChatGLMTokenizer

    opts = {
        "num_image_tokens": tokenizer_config.get("num_image_tokens", 20000),  # 20000: the class default
        "remove_space": bool(tokenizer_config.get("remove_space", False)),
        "do_lower_case": bool(tokenizer_config.get("do_lower_case", False)),
    }
    return ChatGLMTokenizer(vocab_file, **{**opts, **kwargs})


TOKENIZER = TokenizerFormat("chatglm", files=("ice_text.model",), build=_tokenizer)

FAMILY = Family(
    id="chatglm",
    recognise=recognise,
    from_hf=from_hf,
    to_hf=to_hf,
    base_hf=base_hf,
    rows=ROWS,
    presets=PRESETS,
    buffers=buffers,
    tied_aliases={"lm_head.weight": "transformer.word_embeddings.weight"},
    buffer_suffixes=("rotary_emb.inv_freq",),
    supports_ptuning=True,
    tokenizers=(TOKENIZER,),
)
