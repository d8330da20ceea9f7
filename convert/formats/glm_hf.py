"""transformers GlmForCausalLM / Glm4ForCausalLM layout (`model.layers.{l}...`, separate q/k/v/o)."""
from convert.formats.rows import D, F, KH, NH, V, Row, gate_up, layer_rows, linear

_b = lambda cfg: cfg.qkv_bias  # noqa: E731
_sw = lambda cfg: cfg.sandwich_norm  # noqa: E731


def _bias(shape):
    import numpy as np
    return (lambda cfg, a: [np.ascontiguousarray(a[0].reshape(shape(cfg)))],
            lambda cfg, a: [np.ascontiguousarray(a[0].reshape(-1))])


ROWS = [
    Row(("model.embed_tokens.weight",), ("embed/embedding",)),
    *layer_rows("model.layers.{l}.", "layers_{l}/block/", [
        ("input_layernorm.weight", "input_norm/scale", None, None),
        ("self_attn.q_proj.weight", "attn/q/kernel", linear(D, NH), None),
        ("self_attn.q_proj.bias", "attn/q/bias", _bias(NH), _b),
        ("self_attn.k_proj.weight", "attn/k/kernel", linear(D, KH), None),
        ("self_attn.k_proj.bias", "attn/k/bias", _bias(KH), _b),
        ("self_attn.v_proj.weight", "attn/v/kernel", linear(D, KH), None),
        ("self_attn.v_proj.bias", "attn/v/bias", _bias(KH), _b),
        ("self_attn.o_proj.weight", "attn/o/kernel", linear(NH, D), None),
        ("post_self_attn_layernorm.weight", "post_attn_norm/scale", None, _sw),
        ("post_attention_layernorm.weight", "mlp_norm/scale", None, None),
        ("mlp.gate_up_proj.weight", ("mlp/gate/kernel", "mlp/up/kernel"), gate_up(), None),
        ("mlp.down_proj.weight", "mlp/down/kernel", linear(F, D), None),
        ("post_mlp_layernorm.weight", "post_mlp_norm/scale", None, _sw),
    ]),
    Row(("model.norm.weight",), ("final_norm/scale",)),
    Row(("lm_head.weight",), ("lm_head/kernel",), *linear(D, V), when=lambda cfg: not cfg.tie_word_embeddings),
]
