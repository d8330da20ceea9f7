"""ChatGLM2-6B / ChatGLM3-6B / GLM-4-9B remote-code layout (`transformer.encoder.layers.{l}...`)."""
from convert.formats.rows import D, F, NH, V, Row, gate_up, layer_rows, linear, qkv_blocks, qkv_per_head

_ln = lambda cfg: cfg.norm == "layernorm"  # noqa: E731
(_qkv_w, _qkv_b) = qkv_blocks()
(_qkv_w1, _qkv_b1) = qkv_per_head()  # multi_query_attention false: per-head [q|k|v] rows, as ChatGLM-6B
_blocks = lambda cfg: not cfg.qkv_per_head  # noqa: E731
_L = "layers_{l}/block/"
_QKV_W = ("attn/q/kernel", "attn/k/kernel", "attn/v/kernel")
_QKV_B = ("attn/q/bias", "attn/k/bias", "attn/v/bias")

ROWS = [
    Row(("transformer.embedding.word_embeddings.weight",), ("embed/embedding",)),
    *layer_rows("transformer.encoder.layers.{l}.", _L, [
        ("input_layernorm.weight", "input_norm/scale", None, None),
        ("input_layernorm.bias", "input_norm/bias", None, _ln),
        ("self_attention.query_key_value.weight", _QKV_W, _qkv_w, _blocks),
        ("self_attention.query_key_value.weight", _QKV_W, _qkv_w1, lambda cfg: cfg.qkv_per_head),
        ("self_attention.query_key_value.bias", _QKV_B, _qkv_b, lambda cfg: cfg.qkv_bias and _blocks(cfg)),
        ("self_attention.query_key_value.bias", _QKV_B, _qkv_b1, lambda cfg: cfg.qkv_bias and cfg.qkv_per_head),
        ("self_attention.dense.weight", "attn/o/kernel", linear(NH, D), None),
        ("self_attention.dense.bias", "attn/o/bias", None, lambda cfg: cfg.out_bias),
        ("post_attention_layernorm.weight", "mlp_norm/scale", None, None),
        ("post_attention_layernorm.bias", "mlp_norm/bias", None, _ln),
        ("mlp.dense_h_to_4h.weight", ("mlp/gate/kernel", "mlp/up/kernel"), gate_up(), None),
        ("mlp.dense_4h_to_h.weight", "mlp/down/kernel", linear(F, D), None),
    ]),
    Row(("transformer.encoder.final_layernorm.weight",), ("final_norm/scale",), when=lambda cfg: cfg.final_norm),
    Row(("transformer.encoder.final_layernorm.bias",), ("final_norm/bias",),
        when=lambda cfg: cfg.final_norm and _ln(cfg)),
    Row(("transformer.output_layer.weight",), ("lm_head/kernel",), *linear(D, V),
        when=lambda cfg: not cfg.tie_word_embeddings),
]


def _bias_gate_up():
    import numpy as np

    def to_jax(cfg, a):
        g, u = np.split(a[0], 2)
        return [np.ascontiguousarray(g), np.ascontiguousarray(u)]

    def to_hf(cfg, a):
        return [np.concatenate(a)]
    return to_jax, to_hf


ROWS += layer_rows("transformer.encoder.layers.{l}.", _L, [
    ("mlp.dense_h_to_4h.bias", ("mlp/gate/bias", "mlp/up/bias"), _bias_gate_up(), lambda cfg: cfg.mlp_bias),
    ("mlp.dense_4h_to_h.bias", "mlp/down/bias", None, lambda cfg: cfg.mlp_bias),
])

from convert.formats.prefix import PREFIX_ROWS  # noqa: E402

ROWS += PREFIX_ROWS
