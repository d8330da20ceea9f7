"""Original GLM, HF remote-code layout (`glm.` prefix; the Megatron `module` state dict has no prefix)."""
from convert.formats.rows import D, F, NH, Row, layer_rows, linear, qkv_blocks

(_qkv_w, _qkv_b) = qkv_blocks()
_bp = lambda cfg: cfg.block_position_encoding  # noqa: E731

ROWS = [
    Row(("glm.word_embeddings.weight",), ("embed/embedding",)),
    Row(("glm.transformer.position_embeddings.weight",), ("pos_embed/embedding",)),
    Row(("glm.transformer.block_position_embeddings.weight",), ("block_pos_embed/embedding",), when=_bp),
    *layer_rows("glm.transformer.layers.{l}.", "layers_{l}/block/", [
        ("input_layernorm.weight", "input_norm/scale", None, None),
        ("input_layernorm.bias", "input_norm/bias", None, None),
        ("attention.query_key_value.weight", ("attn/q/kernel", "attn/k/kernel", "attn/v/kernel"), _qkv_w, None),
        ("attention.query_key_value.bias", ("attn/q/bias", "attn/k/bias", "attn/v/bias"), _qkv_b, None),
        ("attention.dense.weight", "attn/o/kernel", linear(NH, D), None),
        ("attention.dense.bias", "attn/o/bias", None, None),
        ("post_attention_layernorm.weight", "mlp_norm/scale", None, None),
        ("post_attention_layernorm.bias", "mlp_norm/bias", None, None),
        ("mlp.dense_h_to_4h.weight", "mlp/up/kernel", linear(D, F), None),
        ("mlp.dense_h_to_4h.bias", "mlp/up/bias", None, None),
        ("mlp.dense_4h_to_h.weight", "mlp/down/kernel", linear(F, D), None),
        ("mlp.dense_4h_to_h.bias", "mlp/down/bias", None, None),
    ]),
    Row(("glm.transformer.final_layernorm.weight",), ("final_norm/scale",)),
    Row(("glm.transformer.final_layernorm.bias",), ("final_norm/bias",)),
]

# The Megatron / mp_rank_XX_model_states.pt['module'] naming drops the "glm." prefix.
OPTIONAL_PREFIX = "glm."
