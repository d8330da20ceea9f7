"""ChatGLM-6B (v1) remote-code layout (`transformer.layers.{l}...`, per-head fused QKV, tied lm_head)."""
from convert.formats.prefix import PREFIX_ROWS
from convert.formats.rows import D, F, NH, V, Row, layer_rows, linear, qkv_per_head

(_qkv_w, _qkv_b) = qkv_per_head()

ROWS = [
    Row(("transformer.word_embeddings.weight",), ("embed/embedding",)),
    *layer_rows("transformer.layers.{l}.", "layers_{l}/block/", [
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
    Row(("transformer.final_layernorm.weight",), ("final_norm/scale",)),
    Row(("transformer.final_layernorm.bias",), ("final_norm/bias",)),
    # from_pretrained ties lm_head to the word embeddings (spec §2.6): with tying, the saved lm_head is
    # not a parameter (the loader reads it only to check it exists); without tying it is its own matrix.
    Row(("lm_head.weight",), ("lm_head/kernel",), *linear(D, V), when=lambda cfg: not cfg.tie_word_embeddings),
    *PREFIX_ROWS,
]

# Keys that the reference writes but that are not parameters of a tied model.
TIED_ALIASES = {"lm_head.weight": "transformer.word_embeddings.weight"}
