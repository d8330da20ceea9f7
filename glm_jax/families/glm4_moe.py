"""transformers' Glm4MoeForCausalLM (GLM-4.5, GLM-4.5-Air, GLM-4.6, GLM-4.7): glm-hf's attention with optional
per-head q/k RMSNorm and rotate-half partial rotary, a dense SwiGLU MLP in the first `first_k_dense_replace`
layers, then routed + shared SwiGLU experts behind a sigmoid router with `e_score_correction_bias`.

On disk the experts are per-expert keys (`mlp.experts.{e}.{gate,up,down}_proj.weight`); the key map stacks them
into [E, in, out] arrays. The released checkpoints store `num_nextn_predict_layers` multi-token-prediction layers
after the last layer (`model.layers.{num_hidden_layers}.*`: a MoE decoder block plus eh_proj, enorm, hnorm,
shared_head and embed_tokens); they load into `mtp_{m}/` and export back bit for bit. A checkpoint saved by
transformers itself has no MTP weights even though its config.json says num_nextn_predict_layers=1, so the
number of MTP layers is taken from the keys present (`fit_to_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from glm_jax.errors import ConfigError
from glm_jax.families import glm_hf
from glm_jax.families.base import Family, TokenizerFormat, eos_out, need_int, number
from glm_jax.families.rows import HF_ATTENTION, D, F, Row, V, layer_rows, linear, untied

_MOE_KEYS = {  # config.json key -> (GLMConfig field, Glm4MoeConfig's default)
    "n_routed_experts": ("num_experts", 128),
    "num_experts_per_tok": ("num_experts_per_tok", 8),
    "n_shared_experts": ("n_shared_experts", 1),
    "moe_intermediate_size": ("moe_intermediate_size", 1408),
    "n_group": ("n_group", 1),
    "topk_group": ("topk_group", 1),
    "num_nextn_predict_layers": ("num_mtp_layers", 1),
}


def recognise(d: dict) -> bool:
    archs = " ".join(d.get("architectures") or [])
    return d.get("model_type") == "glm4_moe" or "Glm4MoeFor" in archs or archs == "Glm4MoeModel"


def first_dense(d: dict) -> int:
    """first_k_dense_replace, or (transformers 5.x) the leading "dense" entries of mlp_layer_types."""
    types = d.get("mlp_layer_types")
    if types is None:
        return need_int(d, "first_k_dense_replace", 1)
    if not isinstance(types, list) or len(types) != d["num_hidden_layers"]:
        raise ConfigError(f"mlp_layer_types must list one entry per layer ({d['num_hidden_layers']}), got {types!r}")
    k = next((i for i, t in enumerate(types) if t != "dense"), len(types))
    if any(t not in ("sparse", "moe") for t in types[k:]):
        raise ConfigError(f"mlp_layer_types {types!r}: only dense layers followed by sparse layers are supported")
    return k


def from_hf(d: dict) -> dict:
    kw = glm_hf.from_hf(d)
    kw.update(
        position_encoding="rope_half",  # Glm4Moe rotates the first rope_dim dims in halves (Llama style), not in pairs
        qkv_bias=bool(d.get("attention_bias", False)),
        norm_eps=d.get("rms_norm_eps", 1e-5),
        qk_norm=bool(d.get("use_qk_norm", False)),
        first_k_dense_replace=first_dense(d),
        norm_topk_prob=bool(d.get("norm_topk_prob", True)),
        routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
    )
    if d.get("num_key_value_heads") is None:
        kw["num_kv_heads"] = 8
    for key, (field, default) in _MOE_KEYS.items():
        kw[field] = need_int(d, key, default)
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {d.get('hidden_act')!r} is not supported (only 'silu')")
    return kw


def to_hf(c) -> dict:
    out = glm_hf.to_hf(c)
    src = c.hf_config or {}
    out.update({key: getattr(c, field) for key, (field, _) in _MOE_KEYS.items()})
    if not c.num_mtp_layers and src.get("num_nextn_predict_layers"):
        out["num_nextn_predict_layers"] = src["num_nextn_predict_layers"]  # the checkpoint left its MTP out
    out.update(
        use_qk_norm=c.qk_norm,
        norm_topk_prob=c.norm_topk_prob,
        routed_scaling_factor=number(c.routed_scaling_factor),
    )
    if "mlp_layer_types" in src:
        k = c.first_k_dense_replace
        out["mlp_layer_types"] = ["dense"] * k + ["sparse"] * (c.num_layers - k)
    else:
        out["first_k_dense_replace"] = c.first_k_dense_replace
    return out


def base_hf(c) -> dict:
    return {
        **glm_hf.base_hf(c, "Glm4MoeForCausalLM", "glm4_moe"),
        "output_router_logits": False,
        "eos_token_id": eos_out(c),
    }


def fit_to_checkpoint(cfg, keys):
    """num_mtp_layers = the MTP layers the checkpoint holds (save_pretrained drops them but keeps the config key)."""
    if not cfg.num_mtp_layers:
        return cfg
    idx = {int(m.group(1)) for k in keys if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    held = sum(1 for i in range(cfg.num_layers, cfg.num_layers + cfg.num_mtp_layers) if i in idx)
    return cfg if held == cfg.num_mtp_layers else cfg.replace(num_mtp_layers=held)


# ---------------------------------------------------------------- key map
def _qk_norm(cfg) -> bool:
    return cfg.qk_norm


def _shared(cfg) -> bool:
    return cfg.n_shared_experts > 0


def E(cfg):
    return (cfg.num_experts,)


def S(cfg):
    return (cfg.n_shared_experts * cfg.moe_intermediate_size,)


def D2(cfg):
    return (2 * cfg.hidden_size,)


def experts():
    """E per-expert HF linears [out, in] <-> one stacked kernel [E, in, out]."""

    def to_jax(cfg, a):
        out = np.empty((len(a),) + a[0].shape[::-1], a[0].dtype)
        for e, w in enumerate(a):
            out[e] = w.T
        return [out]

    def to_hf(cfg, a):
        (k,) = a
        return [np.ascontiguousarray(k[e].T) for e in range(k.shape[0])]

    return to_jax, to_hf


ATTENTION = [
    *HF_ATTENTION,
    ("self_attn.q_norm.weight", "attn/q_norm/scale", None, _qk_norm),
    ("self_attn.k_norm.weight", "attn/k_norm/scale", None, _qk_norm),
    ("post_attention_layernorm.weight", "mlp_norm/scale", None, None),
]
DENSE = [
    ("mlp.gate_proj.weight", "mlp/gate/kernel", linear(D, F), None),
    ("mlp.up_proj.weight", "mlp/up/kernel", linear(D, F), None),
    ("mlp.down_proj.weight", "mlp/down/kernel", linear(F, D), None),
]
MOE = [
    ("mlp.gate.weight", "moe/router/kernel", linear(D, E), None),
    ("mlp.gate.e_score_correction_bias", "moe/router/score_bias", None, None),
    ("mlp.experts.{e}.gate_proj.weight", "moe/experts/gate", experts(), None),
    ("mlp.experts.{e}.up_proj.weight", "moe/experts/up", experts(), None),
    ("mlp.experts.{e}.down_proj.weight", "moe/experts/down", experts(), None),
    ("mlp.shared_experts.gate_proj.weight", "moe/shared/gate/kernel", linear(D, S), _shared),
    ("mlp.shared_experts.up_proj.weight", "moe/shared/up/kernel", linear(D, S), _shared),
    ("mlp.shared_experts.down_proj.weight", "moe/shared/down/kernel", linear(S, D), _shared),
]
MTP = [
    ("embed_tokens.weight", "embed/embedding", None, None),
    ("enorm.weight", "enorm/scale", None, None),
    ("hnorm.weight", "hnorm/scale", None, None),
    ("eh_proj.weight", "eh_proj/kernel", linear(D2, D), None),
    ("shared_head.norm.weight", "head_norm/scale", None, None),
    ("shared_head.head.weight", "head/kernel", linear(D, V), None),
]


def _dense_layers(cfg):
    return [i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)]


def _moe_layers(cfg):
    return [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]


def _mtp_layers(cfg):
    return range(cfg.num_layers, cfg.num_layers + cfg.num_mtp_layers)


def _rows(jax_prefix, names, layers):
    return [dataclasses.replace(r, layers=layers) for r in layer_rows("model.layers.{l}.", jax_prefix, names)]


def _main_attention(cfg):
    return range(cfg.num_layers)


ROWS = (
    Row(("model.embed_tokens.weight",), ("embed/embedding",)),
    *_rows("layers_{l}/block/", ATTENTION, _main_attention),
    *_rows("layers_{l}/block/", DENSE, _dense_layers),
    *_rows("layers_{l}/block/", MOE, _moe_layers),
    *_rows("mtp_{m}/", MTP, _mtp_layers),
    *_rows("mtp_{m}/block/", ATTENTION + MOE, _mtp_layers),
    Row(("model.norm.weight",), ("final_norm/scale",)),
    Row(("lm_head.weight",), ("lm_head/kernel",), *linear(D, V), when=untied),
)


def _released(hidden, layers, inter, moe_inter, experts, dense, qk_norm, scaling, max_pos):
    return dict(
        architectures=["Glm4MoeForCausalLM"],
        model_type="glm4_moe",
        attention_bias=True,
        attention_dropout=0.0,
        eos_token_id=[151329, 151336, 151338],
        pad_token_id=151329,
        first_k_dense_replace=dense,
        head_dim=128,
        hidden_act="silu",
        hidden_size=hidden,
        initializer_range=0.02,
        intermediate_size=inter,
        max_position_embeddings=max_pos,
        moe_intermediate_size=moe_inter,
        n_group=1,
        n_routed_experts=experts,
        n_shared_experts=1,
        norm_topk_prob=True,
        num_attention_heads=96,
        num_experts_per_tok=8,
        num_hidden_layers=layers,
        num_key_value_heads=8,
        num_nextn_predict_layers=1,
        partial_rotary_factor=0.5,
        rms_norm_eps=1e-05,
        rope_scaling=None,
        rope_theta=1000000,
        routed_scaling_factor=scaling,
        tie_word_embeddings=False,
        topk_group=1,
        torch_dtype="bfloat16",
        use_cache=True,
        use_qk_norm=qk_norm,
        vocab_size=151552,
    )


PRESETS = {  # the config.json of zai-org/GLM-4.5, GLM-4.5-Air and GLM-4.6 (GLM-4.7 has GLM-4.6's shape)
    "glm4_5": _released(5120, 92, 12288, 1536, 160, 3, True, 2.5, 131072),
    "glm4_5_air": _released(4096, 46, 10944, 1408, 128, 1, False, 1.0, 131072),
    "glm4_6": _released(5120, 92, 12288, 1536, 160, 3, True, 2.5, 202752),
}


def _tokenizer_score(path: str, tokenizer_config: dict) -> int:
    """GLM-4.5's tokenizer.json lists its tool-call tokens (<arg_key>) among its added tokens; other
    tokenizer.json files (GLM-4-0414's...) have no glm-jax chat format."""
    from glm_jax.tokenizers.glm45 import is_glm45_tokenizer_json

    return 2 if is_glm45_tokenizer_json(path) else 0


def _tokenizer(vocab_file: str, folder: str, tokenizer_config: dict, **kwargs):
    from glm_jax.tokenizers.glm45 import GLM45Tokenizer, template_variant_of

    opts = {
        "clean_up_tokenization_spaces": bool(tokenizer_config.get("clean_up_tokenization_spaces", False)),
        "template_variant": template_variant_of(folder, tokenizer_config),
    }
    return GLM45Tokenizer(vocab_file, **{**opts, **kwargs})


TOKENIZER = TokenizerFormat(
    "glm4_5",
    files=("tokenizer.json",),
    build=_tokenizer,
    score=_tokenizer_score,
    what="a GLM-4.5 tokenizer.json",
    unfit="not a GLM-4.5 tokenizer.json (no <arg_key> added token)",
)

FAMILY = Family(
    id="glm4-moe",
    recognise=recognise,
    from_hf=from_hf,
    to_hf=to_hf,
    base_hf=base_hf,
    rows=ROWS,
    presets=PRESETS,
    dtype_key="dtype",
    tokenizers=(TOKENIZER,),
    fit_to_checkpoint=fit_to_checkpoint,
)
