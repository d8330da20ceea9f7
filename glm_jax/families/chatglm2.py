"""ChatGLM2-6B, ChatGLM3-6B (-base, -32k) and GLM-4-9B(-chat) remote code (`modeling_chatglm` with
`multi_query_group_num`).

RoPE on the first half of each head as interleaved pairs with base 10000 * rope_ratio, pre-RMSNorm, GQA with a
fused [Q|K|V] row block and bias, SwiGLU with a fused [gate|up] block, separate output_layer. Default mask:
causal. chatglm2-6b-32k divides positions by rope_ratio instead (recognised by its name or an explicit
"rope_interpolation": true). The checkpoint saves one rotary inv_freq buffer.
"""

from __future__ import annotations

from glm_jax.families.base import Family, TokenizerFormat, eos_ids, eos_out, is_chatglm_remote, number
from glm_jax.families.chatglm import AUTO_MAP as _V1_AUTO_MAP
from glm_jax.families.rows import (
    NH,
    PREFIX_ROWS,
    D,
    F,
    Row,
    V,
    gate_up,
    layer_rows,
    linear,
    qkv_blocks,
    qkv_per_head,
    split_halves,
    untied,
)
from glm_jax.quant.rows import bits_from_hf, bits_to_hf

AUTO_MAP = {**_V1_AUTO_MAP, "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}


def recognise(d: dict) -> bool:
    return is_chatglm_remote(d) and ("multi_query_group_num" in d or "padded_vocab_size" in d or "kv_channels" in d)


def from_hf(d: dict) -> dict:
    n = d["num_attention_heads"]
    kv = d["kv_channels"] if d.get("kv_channels") is not None else d["hidden_size"] // n  # 0 stays 0 (refused)
    mqa = d.get("multi_query_attention", True)
    g = d.get("multi_query_group_num", n) if mqa else n
    ratio = float(d.get("rope_ratio", 1))
    # chatglm2-6b-32k divides positions by rope_ratio; chatglm3-6b-32k and GLM-4 multiply the base by it. The
    # config.json files look alike, so the 32k ChatGLM2 is recognised by its name (or an explicit flag).
    interpolate = bool(d.get("rope_interpolation", "chatglm2-6b-32k" in str(d.get("_name_or_path", ""))))
    bias = bool(d.get("add_bias_linear", False))
    return dict(
        vocab_size=d.get("padded_vocab_size", d.get("vocab_size")),
        hidden_size=d["hidden_size"],
        num_layers=d.get("num_layers", d.get("num_hidden_layers")),
        num_heads=n,
        num_kv_heads=g,
        head_dim=kv,
        ffn_size=d["ffn_hidden_size"],
        norm="rmsnorm" if d.get("rmsnorm", True) else "layernorm",
        norm_eps=d.get("layernorm_epsilon", 1e-5),
        residual_from_norm=bool(d.get("apply_residual_connection_post_layernorm", False)),
        final_norm=d.get("post_layer_norm", True),
        position_encoding="rope_interleaved",
        rope_dim=kv // 2,
        rope_base=10000.0 if interpolate else 10000.0 * ratio,
        rope_position_scale=ratio if interpolate else 1.0,
        max_position_embeddings=d.get("seq_length", 32768),
        qkv_bias=bool(d.get("add_qkv_bias", False) or bias),
        qkv_per_head=not mqa,
        out_bias=bias,
        mlp="swiglu",
        mlp_bias=bias,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        mask_rule="causal",
        position_rule="sequential",
        pad_token_id=d.get("pad_token_id"),
        eos_token_id=eos_ids(d),
        pre_seq_len=d.get("pre_seq_len") or 0,
        prefix_projection=bool(d.get("prefix_projection", False)),
        quantization_bit=bits_from_hf(d),
        prefix_hidden_size=d["hidden_size"],
    )


def to_hf(c) -> dict:
    out = {
        "padded_vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "multi_query_group_num": c.num_kv_heads,
        "kv_channels": c.head_dim,
        "multi_query_attention": not c.qkv_per_head,
        "ffn_hidden_size": c.ffn_size,
        "layernorm_epsilon": c.norm_eps,
        "seq_length": c.max_position_embeddings,
        "rmsnorm": c.norm == "rmsnorm",
        "post_layer_norm": c.final_norm,
        "apply_residual_connection_post_layernorm": c.residual_from_norm,
        "add_qkv_bias": c.qkv_bias,
        "add_bias_linear": c.out_bias,
        "pre_seq_len": c.pre_seq_len or None,
        "prefix_projection": c.prefix_projection,
        "quantization_bit": bits_to_hf(c),
    }
    if c.rope_base != 10000.0:
        out["rope_ratio"] = number(c.rope_base / 10000.0)
    if c.rope_position_scale != 1.0:
        out["rope_ratio"], out["rope_interpolation"] = number(c.rope_position_scale), True
    return out


def base_hf(c) -> dict:
    return {
        "architectures": ["ChatGLMModel"],
        "model_type": "chatglm",
        "auto_map": dict(AUTO_MAP),
        "vocab_size": c.vocab_size,
        "multi_query_attention": True,
        "apply_query_key_layer_scaling": True,
        "attention_softmax_in_fp32": True,
        "fp32_residual_connection": False,
        "original_rope": True,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "bias_dropout_fusion": True,
        "eos_token_id": eos_out(c),
        "pad_token_id": c.pad_token_id,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": "bfloat16",
    }


def buffers(cfg, dtype: str) -> list:
    """The rotary inv_freq, computed in the weights' dtype with base 10000 whatever rope_ratio (as the reference)."""
    import torch

    from glm_jax.dtypes import torch_dtype, torch_to_numpy

    dim = cfg.rope_dim
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).to(torch_dtype(dtype)) / dim))
    return [
        ("transformer.rotary_pos_emb.inv_freq", "transformer.embedding.word_embeddings.weight", torch_to_numpy(inv))
    ]


def _layernorm(cfg) -> bool:
    return cfg.norm == "layernorm"


def _qkv_blocks(cfg) -> bool:
    return not cfg.qkv_per_head


def _qkv_per_head(cfg) -> bool:
    return cfg.qkv_per_head


def _qkv_bias_blocks(cfg) -> bool:
    return cfg.qkv_bias and not cfg.qkv_per_head


def _qkv_bias_per_head(cfg) -> bool:
    return cfg.qkv_bias and cfg.qkv_per_head


def _out_bias(cfg) -> bool:
    return cfg.out_bias


def _mlp_bias(cfg) -> bool:
    return cfg.mlp_bias


def _final_norm(cfg) -> bool:
    return cfg.final_norm


def _final_norm_bias(cfg) -> bool:
    return cfg.final_norm and cfg.norm == "layernorm"


(_QKV_W, _QKV_B) = qkv_blocks()
(_QKV_W_PER_HEAD, _QKV_B_PER_HEAD) = qkv_per_head()  # multi_query_attention false: per-head [q|k|v] rows
_QKV = ("attn/q/kernel", "attn/k/kernel", "attn/v/kernel")
_QKV_BIAS = ("attn/q/bias", "attn/k/bias", "attn/v/bias")

ROWS = (
    Row(("transformer.embedding.word_embeddings.weight",), ("embed/embedding",)),
    *layer_rows(
        "transformer.encoder.layers.{l}.",
        "layers_{l}/block/",
        [
            ("input_layernorm.weight", "input_norm/scale", None, None),
            ("input_layernorm.bias", "input_norm/bias", None, _layernorm),
            ("self_attention.query_key_value.weight", _QKV, _QKV_W, _qkv_blocks),
            ("self_attention.query_key_value.weight", _QKV, _QKV_W_PER_HEAD, _qkv_per_head),
            ("self_attention.query_key_value.bias", _QKV_BIAS, _QKV_B, _qkv_bias_blocks),
            ("self_attention.query_key_value.bias", _QKV_BIAS, _QKV_B_PER_HEAD, _qkv_bias_per_head),
            ("self_attention.dense.weight", "attn/o/kernel", linear(NH, D), None),
            ("self_attention.dense.bias", "attn/o/bias", None, _out_bias),
            ("post_attention_layernorm.weight", "mlp_norm/scale", None, None),
            ("post_attention_layernorm.bias", "mlp_norm/bias", None, _layernorm),
            ("mlp.dense_h_to_4h.weight", ("mlp/gate/kernel", "mlp/up/kernel"), gate_up(), None),
            ("mlp.dense_4h_to_h.weight", "mlp/down/kernel", linear(F, D), None),
        ],
    ),
    Row(("transformer.encoder.final_layernorm.weight",), ("final_norm/scale",), when=_final_norm),
    Row(("transformer.encoder.final_layernorm.bias",), ("final_norm/bias",), when=_final_norm_bias),
    Row(("transformer.output_layer.weight",), ("lm_head/kernel",), *linear(D, V), when=untied),
    *layer_rows(
        "transformer.encoder.layers.{l}.",
        "layers_{l}/block/",
        [
            ("mlp.dense_h_to_4h.bias", ("mlp/gate/bias", "mlp/up/bias"), split_halves(), _mlp_bias),
            ("mlp.dense_4h_to_h.bias", "mlp/down/bias", None, _mlp_bias),
        ],
    ),
    *PREFIX_ROWS,
)

_CHATGLM2_6B = dict(
    architectures=["ChatGLMModel"],
    model_type="chatglm",
    auto_map=dict(AUTO_MAP),
    add_bias_linear=False,
    add_qkv_bias=True,
    apply_query_key_layer_scaling=True,
    apply_residual_connection_post_layernorm=False,
    attention_dropout=0.0,
    attention_softmax_in_fp32=True,
    bias_dropout_fusion=True,
    ffn_hidden_size=13696,
    fp32_residual_connection=False,
    hidden_dropout=0.0,
    hidden_size=4096,
    kv_channels=128,
    layernorm_epsilon=1e-05,
    multi_query_attention=True,
    multi_query_group_num=2,
    num_attention_heads=32,
    num_layers=28,
    original_rope=True,
    padded_vocab_size=65024,
    post_layer_norm=True,
    rmsnorm=True,
    seq_length=32768,
    use_cache=True,
    vocab_size=65024,
    tie_word_embeddings=False,
    eos_token_id=2,
    pad_token_id=0,
    pre_seq_len=None,
    prefix_projection=False,
    quantization_bit=0,
    torch_dtype="float16",
)
_GLM4_9B = {k: v for k, v in _CHATGLM2_6B.items() if k not in ("pre_seq_len", "prefix_projection", "quantization_bit")}

PRESETS = {
    "chatglm2_6b": dict(_CHATGLM2_6B),
    "chatglm3_6b": dict(_CHATGLM2_6B, seq_length=8192),
    "chatglm3_6b_32k": dict(_CHATGLM2_6B, rope_ratio=50),
    "glm4_9b": dict(
        _GLM4_9B,
        num_layers=40,
        num_hidden_layers=40,
        padded_vocab_size=151552,
        vocab_size=151552,
        seq_length=131072,
        rope_ratio=500,
        layernorm_epsilon=1.5625e-07,
        eos_token_id=[151329, 151336, 151338],
        pad_token_id=151329,
        torch_dtype="bfloat16",
    ),
}


# ------------------------------------------------------------------ tokenizers
# ChatGLM2 and ChatGLM3 ship the same kind of sentencepiece tokenizer.model (only tokenizer_config.json's name
# tells them apart); GLM-4's remote-code tokenizer.model holds tiktoken ranks.
def _is_tiktoken(path: str) -> bool:
    from glm_jax.tokenizers.glm4 import is_tiktoken_file

    return is_tiktoken_file(path)


def _is_sentencepiece(path: str) -> bool:
    return not _is_tiktoken(path)


def _named(chat_format: str, path: str, tokenizer_config: dict) -> int:
    if _is_tiktoken(path):
        return 0
    name = " ".join(str(tokenizer_config.get(k, "")) for k in ("name_or_path", "_name_or_path")).lower()
    return 2 if chat_format in name else 1


def _chatglm2_score(path: str, tokenizer_config: dict) -> int:
    return _named("chatglm2", path, tokenizer_config)


def _chatglm3_score(path: str, tokenizer_config: dict) -> int:
    return _named("chatglm3", path, tokenizer_config)


def _glm4_score(path: str, tokenizer_config: dict) -> int:
    return 2 if _is_tiktoken(path) else 0


def _chatglm2_tokenizer(vocab_file: str, folder: str, tokenizer_config: dict, **kwargs):
    from glm_jax.tokenizers.chatglm2 import ChatGLM2Tokenizer

    return ChatGLM2Tokenizer(vocab_file, **kwargs)


def _chatglm3_tokenizer(vocab_file: str, folder: str, tokenizer_config: dict, **kwargs):
    from glm_jax.tokenizers.chatglm2 import ChatGLM3Tokenizer

    opts = {"encode_special_tokens": bool(tokenizer_config.get("encode_special_tokens", False))}
    return ChatGLM3Tokenizer(vocab_file, **{**opts, **kwargs})


def _glm4_special_ids(tokenizer_config: dict) -> dict[str, int] | None:
    added = tokenizer_config.get("added_tokens_decoder")
    if not isinstance(added, dict) or not added:
        return None
    try:
        return {str(v["content"]): int(k) for k, v in added.items()}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"tokenizer_config.json: malformed added_tokens_decoder ({e})") from e


def _glm4_tokenizer(vocab_file: str, folder: str, tokenizer_config: dict, **kwargs):
    from glm_jax.tokenizers.glm4 import GLM4Tokenizer

    return GLM4Tokenizer(vocab_file, **{"special_tokens": _glm4_special_ids(tokenizer_config), **kwargs})


_SENTENCEPIECE = "a sentencepiece model, not tiktoken ranks"
CHATGLM2_TOKENIZER = TokenizerFormat(
    "chatglm2", ("tokenizer.model",), _chatglm2_tokenizer, _is_sentencepiece, _chatglm2_score, _SENTENCEPIECE
)
CHATGLM3_TOKENIZER = TokenizerFormat(
    "chatglm3", ("tokenizer.model",), _chatglm3_tokenizer, _is_sentencepiece, _chatglm3_score, _SENTENCEPIECE
)
GLM4_TOKENIZER = TokenizerFormat(
    "glm4", ("tokenizer.model",), _glm4_tokenizer, _is_tiktoken, _glm4_score, "tiktoken ranks ('base64-token rank')"
)

FAMILY = Family(
    id="chatglm2",
    recognise=recognise,
    from_hf=from_hf,
    to_hf=to_hf,
    base_hf=base_hf,
    rows=ROWS,
    presets=PRESETS,
    buffers=buffers,
    buffer_suffixes=("rotary_pos_emb.inv_freq",),
    supports_ptuning=True,
    tokenizers=(CHATGLM2_TOKENIZER, CHATGLM3_TOKENIZER, GLM4_TOKENIZER),
)
