"""ChatGLM-6B (v1) remote-code layout (`transformer.layers.{l}...`, per-head fused QKV, tied lm_head)."""
from convert.formats.prefix import PREFIX_ROWS
from convert.formats.rows import D, V, Row, linear, megatron_layer_rows, qkv_per_head


ROWS = [
    Row(("transformer.word_embeddings.weight",), ("embed/embedding",)),
    *megatron_layer_rows("transformer.layers.{l}.", qkv_per_head()),
    Row(("transformer.final_layernorm.weight",), ("final_norm/scale",)),
    Row(("transformer.final_layernorm.bias",), ("final_norm/bias",)),
    # from_pretrained ties lm_head to the word embeddings (spec §2.6): with tying, the saved lm_head is
    # not a parameter (the loader reads it only to check it exists); without tying it is its own matrix.
    Row(("lm_head.weight",), ("lm_head/kernel",), *linear(D, V), when=lambda cfg: not cfg.tie_word_embeddings),
    *PREFIX_ROWS,
]

# Keys that the reference writes but that are not parameters of a tied model.
TIED_ALIASES = {"lm_head.weight": "transformer.word_embeddings.weight"}
