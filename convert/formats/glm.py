"""Original GLM, HF remote-code layout (`glm.` prefix; the Megatron `module` state dict has no prefix)."""
from convert.formats.rows import Row, megatron_layer_rows, qkv_blocks

_bp = lambda cfg: cfg.block_position_encoding  # noqa: E731

ROWS = [
    Row(("glm.word_embeddings.weight",), ("embed/embedding",)),
    Row(("glm.transformer.position_embeddings.weight",), ("pos_embed/embedding",)),
    Row(("glm.transformer.block_position_embeddings.weight",), ("block_pos_embed/embedding",), when=_bp),
    *megatron_layer_rows("glm.transformer.layers.{l}.", qkv_blocks()),
    Row(("glm.transformer.final_layernorm.weight",), ("final_norm/scale",)),
    Row(("glm.transformer.final_layernorm.bias",), ("final_norm/bias",)),
]

# The Megatron / mp_rank_XX_model_states.pt['module'] naming drops the "glm." prefix.
OPTIONAL_PREFIX = "glm."
