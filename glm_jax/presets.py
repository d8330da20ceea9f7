"""Released GLM models at their real sizes, as the config.json their checkpoints ship with.

`GLMConfig.preset(name)` reads these through `GLMConfig.from_hf`, so a preset is exactly what loading the
released checkpoint's config.json gives. `glm_small` is the default model of `make train`.
"""
_CHATGLM_AUTO = {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                 "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                 "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
                 "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}
_GLM_AUTO = {"AutoConfig": "configuration_glm.GLMConfig", "AutoModel": "modeling_glm.GLMModel",
             "AutoModelForSeq2SeqLM": "modeling_glm.GLMForConditionalGeneration"}

_CHATGLM2 = dict(
    architectures=["ChatGLMModel"], model_type="chatglm", auto_map=_CHATGLM_AUTO, add_bias_linear=False,
    add_qkv_bias=True, apply_query_key_layer_scaling=True, apply_residual_connection_post_layernorm=False,
    attention_dropout=0.0, attention_softmax_in_fp32=True, bias_dropout_fusion=True, ffn_hidden_size=13696,
    fp32_residual_connection=False, hidden_dropout=0.0, hidden_size=4096, kv_channels=128,
    layernorm_epsilon=1e-05, multi_query_attention=True, multi_query_group_num=2, num_attention_heads=32,
    num_layers=28, original_rope=True, padded_vocab_size=65024, post_layer_norm=True, rmsnorm=True,
    seq_length=32768, use_cache=True, vocab_size=65024, tie_word_embeddings=False, eos_token_id=2,
    pad_token_id=0, pre_seq_len=None, prefix_projection=False, quantization_bit=0, torch_dtype="float16")

PRESETS = {
    "glm_small": dict(  # ~20M parameters: the default model of `make train`
        architectures=["GLMForConditionalGeneration"], model_type="glm", auto_map=_GLM_AUTO,
        vocab_size=8192, hidden_size=256, num_layers=4, num_attention_heads=4, max_sequence_length=512,
        block_position_encoding=True, output_predict=True),
    "glm_large": dict(
        architectures=["GLMForConditionalGeneration"], model_type="glm", auto_map=_GLM_AUTO,
        vocab_size=30592, hidden_size=1024, num_layers=24, num_attention_heads=16, max_sequence_length=512,
        block_position_encoding=True, output_predict=True),
    "glm_10b": dict(
        architectures=["GLMForConditionalGeneration"], model_type="glm", auto_map=_GLM_AUTO,
        vocab_size=50304, hidden_size=4096, num_layers=48, num_attention_heads=64, max_sequence_length=1024,
        block_position_encoding=True, output_predict=True),
    "chatglm_6b": dict(
        architectures=["ChatGLMModel"], model_type="chatglm", auto_map=_CHATGLM_AUTO, bos_token_id=130004,
        eos_token_id=130005, mask_token_id=130000, gmask_token_id=130001, pad_token_id=3, hidden_size=4096,
        inner_hidden_size=16384, layernorm_epsilon=1e-05, max_sequence_length=2048, num_attention_heads=32,
        num_layers=28, position_encoding_2d=True, quantization_bit=0, pre_seq_len=None, prefix_projection=False,
        use_cache=True, vocab_size=130528, torch_dtype="float16"),
    "chatglm2_6b": dict(_CHATGLM2),
    "chatglm3_6b": dict(_CHATGLM2, seq_length=8192),
    "chatglm3_6b_32k": dict(_CHATGLM2, rope_ratio=50),
    "glm4_9b": dict(
        _CHATGLM2, num_layers=40, num_hidden_layers=40, padded_vocab_size=151552, vocab_size=151552,
        seq_length=131072, rope_ratio=500, layernorm_epsilon=1.5625e-07, eos_token_id=[151329, 151336, 151338],
        pad_token_id=151329, torch_dtype="bfloat16", pre_seq_len=None),
    "glm4_9b_0414": dict(
        architectures=["Glm4ForCausalLM"], model_type="glm4", attention_bias=True, attention_dropout=0.0,
        eos_token_id=[151329, 151336, 151338], head_dim=128, hidden_act="silu", hidden_size=4096,
        initializer_range=0.02, intermediate_size=13696, max_position_embeddings=32768, num_attention_heads=32,
        num_hidden_layers=40, num_key_value_heads=2, pad_token_id=151329, partial_rotary_factor=0.5,
        rms_norm_eps=1e-05, rope_theta=10000.0, tie_word_embeddings=False, use_cache=True, vocab_size=151552,
        dtype="bfloat16"),
}
for _k in ("glm4_9b",):
    PRESETS[_k].pop("pre_seq_len"), PRESETS[_k].pop("prefix_projection"), PRESETS[_k].pop("quantization_bit")
