"""The original GLM (THUDM glm-large, glm-10b, glm-large-chinese; HF remote code `modeling_glm`, and THUDM/GLM's
Megatron `mp_rank_XX_model_states.pt`).

Learned absolute 2-D positions (position + block position tables), pre-LN LayerNorm, fused qkv rows [Q|K|V],
GELU, output tied to the word embeddings. Default mask: GLM's sep rule (the context before the first <sop> is
bidirectional). Its config.json shares model_type "glm" with transformers' Glm, so it is recognised by
`modeling_glm` in auto_map / architectures.
"""

from __future__ import annotations

from glm_jax.families.base import Family, TokenizerFormat, auto_map_names, eos_ids
from glm_jax.families.rows import Row, megatron_layer_rows, qkv_blocks

_AUTO = {
    "AutoConfig": "configuration_glm.GLMConfig",
    "AutoModel": "modeling_glm.GLMModel",
    "AutoModelForSeq2SeqLM": "modeling_glm.GLMForConditionalGeneration",
}

# Command-token ids of the released GLM tokenizers, keyed by padded vocab size (and width, where GLM-RoBERTa and
# GLM-2B/10B share a vocab size): (pad/eos, sop, eop, [MASK], [sMASK], [gMASK]).
_TOKENS = {
    (30592, None): (0, 30522, 30523, 103, None, None),  # BERT wordpiece (GLM-Base/Large/Doc/410M/515M)
    (50304, "roberta"): (2, 50265, 50266, 50264, None, None),  # GLM-RoBERTa
    (50304, "gpt2"): (50256, 50257, 50258, 50260, 50264, 50263),  # GLM-2B, GLM-10B
    (50048, None): (50000, 50006, 50007, 50003, 50008, 50009),  # GLM-Large-Chinese, GLM-10B-Chinese (HF ids)
}


def recognise(d: dict) -> bool:
    names = auto_map_names(d)
    archs = " ".join(d.get("architectures") or [])
    return "modeling_glm." in names or archs.startswith("GLMFor") or archs == "GLMModel"


def _default_tokens(d):
    v = d.get("vocab_size")
    key = (v, ("gpt2" if d.get("hidden_size", 1024) >= 2048 else "roberta") if v == 50304 else None)
    return _TOKENS.get(key)


def _tokens(d):
    """Special ids from config.json when it names them, else those of the released tokenizer of that vocab."""
    pad, sop, eop, mask, smask, gmask = _default_tokens(d) or (None,) * 6
    return dict(
        mask_token_id=d.get("mask_token_id", mask),
        smask_token_id=d.get("smask_token_id", smask),
        gmask_token_id=d.get("gmask_token_id", gmask),
        bos_token_id=d.get("sop_token_id", sop),
        pad_token_id=d.get("pad_token_id", pad),
        eos_token_id=eos_ids(d) or tuple(t for t in (eop, pad) if t is not None),
    )


def from_hf(d: dict) -> dict:
    h = d.get("hidden_size", 1024)
    n = d.get("num_attention_heads", 16)
    return dict(
        vocab_size=d.get("vocab_size", 30592),
        hidden_size=h,
        num_layers=d.get("num_layers", d.get("num_hidden_layers", 24)),
        num_heads=n,
        num_kv_heads=n,
        head_dim=h // n,
        ffn_size=4 * h,
        norm="layernorm",
        norm_eps=1e-5,
        position_encoding="learned",
        rope_dim=0,
        max_position_embeddings=d.get("max_sequence_length", 512),
        block_position_encoding=d.get("block_position_encoding", True),
        qkv_bias=True,
        out_bias=True,
        mlp=d.get("gelu_variant", "gelu_erf"),
        mlp_bias=True,
        tie_word_embeddings=True,
        mask_rule="sep_at_sop",
        position_rule="per_span_2d",
        **_tokens(d),
    )


def to_hf(c) -> dict:
    out = {
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "max_sequence_length": c.max_position_embeddings,
        "block_position_encoding": c.block_position_encoding,
    }
    # command-token ids that the released tokenizer of this vocab size would not give (e.g. glm-train's bundled
    # tokenizer): written under the keys from_hf reads, so the config.json prompts and stops its model
    base = _tokens({"vocab_size": c.vocab_size, "hidden_size": c.hidden_size})
    ours = dict(
        mask_token_id=c.mask_token_id,
        smask_token_id=c.smask_token_id,
        gmask_token_id=c.gmask_token_id,
        sop_token_id=c.bos_token_id,
        pad_token_id=c.pad_token_id,
        eos_token_id=tuple(c.eos_token_id),
    )
    theirs = {**base, "sop_token_id": base["bos_token_id"], "eos_token_id": tuple(base["eos_token_id"])}
    for k, v in ours.items():
        if v is not None and v != () and v != theirs[k]:
            out[k] = list(v) if isinstance(v, tuple) else v
    return out


def base_hf(c) -> dict:
    return {
        "architectures": ["GLMForConditionalGeneration"],
        "model_type": "glm",
        "auto_map": dict(_AUTO),
        "output_predict": True,
        "attention_scale": 1.0,
        "relative_encoding": False,
        "embedding_dropout_prob": 0.1,
        "attention_dropout_prob": 0.1,
        "output_dropout_prob": 0.1,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
    }


def _block_positions(cfg) -> bool:
    return cfg.block_position_encoding


ROWS = (
    Row(("glm.word_embeddings.weight",), ("embed/embedding",)),
    Row(("glm.transformer.position_embeddings.weight",), ("pos_embed/embedding",)),
    Row(("glm.transformer.block_position_embeddings.weight",), ("block_pos_embed/embedding",), when=_block_positions),
    *megatron_layer_rows("glm.transformer.layers.{l}.", qkv_blocks()),
    Row(("glm.transformer.final_layernorm.weight",), ("final_norm/scale",)),
    Row(("glm.transformer.final_layernorm.bias",), ("final_norm/bias",)),
)


def _preset(**kw):
    return dict(
        architectures=["GLMForConditionalGeneration"],
        model_type="glm",
        auto_map=dict(_AUTO),
        block_position_encoding=True,
        output_predict=True,
        **kw,
    )


PRESETS = {
    # ~20M parameters: the default model of `make train`
    "glm_small": _preset(
        vocab_size=8192, hidden_size=256, num_layers=4, num_attention_heads=4, max_sequence_length=512
    ),
    "glm_large": _preset(
        vocab_size=30592, hidden_size=1024, num_layers=24, num_attention_heads=16, max_sequence_length=512
    ),
    "glm_10b": _preset(
        vocab_size=50304, hidden_size=4096, num_layers=48, num_attention_heads=64, max_sequence_length=1024
    ),
}


def _gpt2_tokenizer(vocab_file: str, folder: str, tokenizer_config: dict, **kwargs):
    from glm_jax.tokenizers.gpt2 import GPT2BPETokenizer

    return GPT2BPETokenizer.from_folder(folder, **kwargs)


# the English GLM checkpoints' GPT-2 BPE (no chat template)
TOKENIZER = TokenizerFormat("gpt2", files=("vocab.json", "merges.txt"), build=_gpt2_tokenizer, chat=False)

FAMILY = Family(
    id="glm",
    recognise=recognise,
    from_hf=from_hf,
    to_hf=to_hf,
    base_hf=base_hf,
    rows=ROWS,
    presets=PRESETS,
    optional_key_prefix="glm.",  # the Megatron state dict ('module' of mp_rank_XX) drops the "glm." prefix
    reads_megatron=True,
    tokenizers=(TOKENIZER,),
)
