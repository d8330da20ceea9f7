"""GLMConfig: one frozen dataclass describing every GLM family.

The families (DESIGN §1) differ only in the fields below; the model code reads these fields and never
branches on the family name. `from_hf` reads a config.json of any family, `to_hf` writes it back with every
key the original had.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Optional

FAMILIES = ("glm", "chatglm", "chatglm2", "glm-hf", "glm4")


class ConfigError(ValueError):
    """A config.json (or a config override) that cannot describe a supported model."""


@dataclasses.dataclass(frozen=True)
class GLMConfig:
    family: str = "glm4"
    vocab_size: int = 512
    hidden_size: int = 64                 # D
    num_layers: int = 2
    num_heads: int = 4                    # N
    num_kv_heads: int = 4                 # K
    head_dim: int = 16                    # H
    ffn_size: int = 256                   # F
    # norms and residuals
    norm: str = "rmsnorm"                 # "rmsnorm" | "layernorm"
    norm_eps: float = 1e-5
    residual_from_norm: bool = False      # residual adds the normalised input (ChatGLM-6B, post-LN variant)
    residual_alpha: float = 1.0           # residual multiplier (ChatGLM-6B: sqrt(2*28))
    sandwich_norm: bool = False           # Glm4: extra norms after attention and after the MLP
    final_norm: bool = True
    # positions
    position: str = "rope_interleaved"    # "learned_2d" | "rope_2d" | "rope_half" | "rope_interleaved"
    rope_dim: int = 8                     # rotated dims per head (per half for rope_2d)
    rope_base: float = 10000.0
    rope_position_scale: float = 1.0      # positions are divided by this (chatglm2-6b-32k interpolation)
    rope_fp16_freqs: bool = False         # ChatGLM-6B rounds its frequencies to float16
    max_position_embeddings: int = 2048   # rows of the learned tables (glm: +1) / rotary table length
    block_position_encoding: bool = True  # glm: the second (block) position table
    # attention / mlp / output
    qkv_bias: bool = True
    qkv_per_head: bool = False            # checkpoint layout only: fused qkv rows grouped per head [q_h|k_h|v_h]
    out_bias: bool = False
    mlp: str = "swiglu"                   # "swiglu" | "gelu_erf" | "gelu_tanh"
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    # default masks and positions when the caller gives none
    mask_rule: str = "causal"             # "causal" | "glm" | "chatglm"
    bos_token_id: Optional[int] = None    # ChatGLM-6B: <sop>, ends the bidirectional context
    mask_token_id: Optional[int] = None
    gmask_token_id: Optional[int] = None
    smask_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    eos_token_id: tuple = ()
    # P-Tuning v2
    pre_seq_len: int = 0
    prefix_projection: bool = False
    prefix_hidden_size: int = 0           # width of the projection MLP's hidden layer
    prefix_embed_size: int = 0            # width of the prefix embedding with projection (0: prefix_width)
    # compute
    dtype: str = "float32"                # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat: str = "none"                   # "none" | "full" | "dots"
    # the original config.json, kept so that it can be written back without losing a key
    hf_config: Optional[dict] = dataclasses.field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"unknown family {self.family!r}; expected one of {FAMILIES}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.position not in ("learned_2d", "rope_2d", "rope_half", "rope_interleaved"):
            raise ConfigError(f"unknown position scheme {self.position!r}")
        if self.mlp not in ("swiglu", "gelu_erf", "gelu_tanh"):
            raise ConfigError(f"unknown mlp {self.mlp!r}")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    # ------------------------------------------------------------------ helpers
    def replace(self, **kw) -> "GLMConfig":
        return dataclasses.replace(self, **kw)

    @property
    def prefix_width(self) -> int:
        """Width of one P-Tuning prefix vector: keys and values of every layer."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        from glm_jax.model.transformer import param_shapes  # local import: avoids a cycle
        import jax
        return sum(math.prod(x.shape) for x in jax.tree.leaves(param_shapes(self)))

    def to_dict(self) -> dict:
        """Every field, JSON-serialisable (the original config.json included under hf_config)."""
        d = dataclasses.asdict(self)
        d["eos_token_id"] = list(self.eos_token_id)
        return d

    @staticmethod
    def from_dict(d: dict) -> "GLMConfig":
        names = {f.name for f in dataclasses.fields(GLMConfig)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown GLMConfig field(s): {sorted(unknown)}")
        return GLMConfig(**{**d, "eos_token_id": tuple(d.get("eos_token_id") or ())})

    # ------------------------------------------------------------------ presets
    @staticmethod
    def preset(name: str, **overrides) -> "GLMConfig":
        from glm_jax.presets import PRESETS
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return GLMConfig.from_hf(PRESETS[name]).replace(**overrides)

    # ------------------------------------------------------------------ config.json
    @staticmethod
    def detect_family(d: dict) -> str:
        archs = " ".join(d.get("architectures") or [])
        auto = json.dumps(d.get("auto_map") or {})
        mt = d.get("model_type")
        if "modeling_glm." in auto or archs.startswith("GLMFor") or archs == "GLMModel":
            return "glm"
        if "modeling_chatglm" in auto or mt == "chatglm":
            if "multi_query_group_num" in d or "padded_vocab_size" in d or "kv_channels" in d:
                return "chatglm2"
            if "position_encoding_2d" in d or "inner_hidden_size" in d:
                return "chatglm"
            raise ConfigError("model_type chatglm, but neither multi_query_group_num (ChatGLM2+) "
                              "nor position_encoding_2d (ChatGLM-6B) is present")
        if mt == "glm4" or "Glm4For" in archs or archs == "Glm4Model":
            return "glm4"
        if mt == "glm" or "GlmFor" in archs or archs == "GlmModel":
            return "glm-hf"
        raise ConfigError(f"unrecognised config: model_type={mt!r}, architectures={d.get('architectures')!r}; "
                          f"supported families: {', '.join(FAMILIES)}")

    @staticmethod
    def from_hf(d: dict, **overrides) -> "GLMConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        family = GLMConfig.detect_family(d)
        try:
            kw = _FROM_HF[family](d)
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{family} config.json is missing or has a bad field: {e!r}") from None
        kw.update(overrides)
        return GLMConfig(family=family, hf_config=dict(d), **kw)

    def to_hf(self) -> dict:
        """config.json for this model in its family's layout, with every key of the original kept."""
        if not self.hf_config:
            return {**_TO_HF_BASE[self.family](self), **_TO_HF[self.family](self)}
        out = dict(self.hf_config)
        for k, v in _TO_HF[self.family](self).items():
            # keys the original did not have are added only when they carry information
            if k in out or (v not in (None, False) and not (k in _CLASS_DEFAULTS and _CLASS_DEFAULTS[k] == v)):
                out[k] = v
        return out


# values that the reference config classes assume when a key is absent (so writing them adds nothing)
_CLASS_DEFAULTS = {"rope_theta": 10000.0, "partial_rotary_factor": 0.5, "max_sequence_length": 512,
                   "block_position_encoding": True, "tie_word_embeddings": False}


def _eos(d):
    e = d.get("eos_token_id")
    if e is None:
        return ()
    return tuple(e) if isinstance(e, (list, tuple)) else (int(e),)


def _rope_theta_and_factor(d):
    """Glm/Glm4 write rope settings either at the top level (<5.0) or in rope_parameters (5.x)."""
    rp = d.get("rope_parameters") or d.get("rope_scaling") or {}
    theta = rp.get("rope_theta", d.get("rope_theta", 10000.0))
    factor = rp.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.5))
    if rp.get("rope_type", "default") not in ("default", None):
        raise ConfigError(f"rope_type {rp.get('rope_type')!r} is not supported (only 'default')")
    return float(theta), float(factor)


# Command-token ids of the released GLM tokenizers (spec GLM_BLANK_INFILLING §1.12), keyed by padded vocab size
# (and width, where GLM-RoBERTa and GLM-2B/10B share a vocab size): (pad/eos, sop, eop, [MASK], [sMASK], [gMASK]).
_GLM_TOKENS = {
    (30592, None): (0, 30522, 30523, 103, None, None),            # BERT wordpiece (GLM-Base/Large/Doc/410M/515M)
    (50304, "roberta"): (2, 50265, 50266, 50264, None, None),     # GLM-RoBERTa
    (50304, "gpt2"): (50256, 50257, 50258, 50260, 50264, 50263),  # GLM-2B, GLM-10B
    (50048, None): (50000, 50006, 50007, 50003, 50008, 50009),    # GLM-Large-Chinese, GLM-10B-Chinese (HF ids)
}


def _glm_default_tokens(d):
    v = d.get("vocab_size")
    key = (v, ("gpt2" if d.get("hidden_size", 1024) >= 2048 else "roberta") if v == 50304 else None)
    return _GLM_TOKENS.get(key)


def _glm_from_hf(d):
    h = d.get("hidden_size", 1024)
    n = d.get("num_attention_heads", 16)
    p = d.get("max_sequence_length", 512)
    return dict(
        vocab_size=d.get("vocab_size", 30592), hidden_size=h, num_layers=d.get("num_layers", d.get("num_hidden_layers", 24)),
        num_heads=n, num_kv_heads=n, head_dim=h // n, ffn_size=4 * h, norm="layernorm", norm_eps=1e-5,
        position="learned_2d", rope_dim=0, max_position_embeddings=p,
        block_position_encoding=d.get("block_position_encoding", True), qkv_bias=True, out_bias=True,
        mlp=d.get("gelu_variant", "gelu_erf"), mlp_bias=True, tie_word_embeddings=True, mask_rule="glm",
        **_glm_tokens(d))


def _glm_tokens(d):
    """Special ids from config.json when it names them, else those of the released tokenizer of that vocab."""
    pad, sop, eop, mask, smask, gmask = _glm_default_tokens(d) or (None,) * 6
    return dict(mask_token_id=d.get("mask_token_id", mask), smask_token_id=d.get("smask_token_id", smask),
                gmask_token_id=d.get("gmask_token_id", gmask), bos_token_id=d.get("sop_token_id", sop),
                pad_token_id=d.get("pad_token_id", pad),
                eos_token_id=_eos(d) or tuple(t for t in (eop, pad) if t is not None))


def _chatglm_from_hf(d):
    h, n = d["hidden_size"], d["num_attention_heads"]
    two_d = d.get("position_encoding_2d", True)
    pre = d.get("pre_seq_len") or 0
    return dict(
        vocab_size=d["vocab_size"], hidden_size=h, num_layers=d["num_layers"], num_heads=n, num_kv_heads=n,
        head_dim=h // n, ffn_size=d.get("inner_hidden_size") or 4 * h, norm="layernorm",
        norm_eps=d.get("layernorm_epsilon", 1e-5), residual_from_norm=True, residual_alpha=math.sqrt(2 * 28),
        position="rope_2d" if two_d else "rope_half", rope_dim=(h // n) // 2 if two_d else h // n,
        rope_fp16_freqs=True, max_position_embeddings=d.get("max_sequence_length", 2048),
        qkv_bias=True, qkv_per_head=True, out_bias=True, mlp="gelu_tanh", mlp_bias=True,
        tie_word_embeddings=d.get("tie_word_embeddings", True), mask_rule="chatglm",
        bos_token_id=d.get("bos_token_id"), mask_token_id=d.get("mask_token_id"),
        gmask_token_id=d.get("gmask_token_id"), pad_token_id=d.get("pad_token_id"), eos_token_id=_eos(d),
        pre_seq_len=pre, prefix_projection=bool(d.get("prefix_projection", False)), prefix_hidden_size=h,
        prefix_embed_size=h)


def _chatglm2_from_hf(d):
    n = d["num_attention_heads"]
    kv = d.get("kv_channels") or d["hidden_size"] // n
    mqa = d.get("multi_query_attention", True)
    g = d.get("multi_query_group_num", n) if mqa else n
    ratio = float(d.get("rope_ratio", 1))
    # chatglm2-6b-32k divides positions by rope_ratio; chatglm3-6b-32k and GLM-4 multiply the base by it. The
    # config.json files look alike, so the 32k ChatGLM2 is recognised by its name (or an explicit flag).
    interpolate = bool(d.get("rope_interpolation", "chatglm2-6b-32k" in str(d.get("_name_or_path", ""))))
    pre = d.get("pre_seq_len") or 0
    return dict(
        vocab_size=d.get("padded_vocab_size", d.get("vocab_size")), hidden_size=d["hidden_size"],
        num_layers=d.get("num_layers", d.get("num_hidden_layers")), num_heads=n, num_kv_heads=g, head_dim=kv,
        ffn_size=d["ffn_hidden_size"], norm="rmsnorm" if d.get("rmsnorm", True) else "layernorm",
        norm_eps=d.get("layernorm_epsilon", 1e-5),
        residual_from_norm=bool(d.get("apply_residual_connection_post_layernorm", False)),
        final_norm=d.get("post_layer_norm", True), position="rope_interleaved", rope_dim=kv // 2,
        rope_base=10000.0 if interpolate else 10000.0 * ratio, rope_position_scale=ratio if interpolate else 1.0,
        max_position_embeddings=d.get("seq_length", 32768),
        qkv_bias=bool(d.get("add_qkv_bias", False) or d.get("add_bias_linear", False)), qkv_per_head=not mqa,
        out_bias=bool(d.get("add_bias_linear", False)), mlp="swiglu", mlp_bias=bool(d.get("add_bias_linear", False)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), mask_rule="causal",
        pad_token_id=d.get("pad_token_id"), eos_token_id=_eos(d),
        pre_seq_len=pre, prefix_projection=bool(d.get("prefix_projection", False)),
        prefix_hidden_size=d["hidden_size"])


def _glmhf_from_hf(d, sandwich=False):
    n = d["num_attention_heads"]
    hd = d.get("head_dim") or d["hidden_size"] // n
    theta, factor = _rope_theta_and_factor(d)
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act {act!r} is not supported for {d.get('model_type')} (only 'silu')")
    return dict(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"], num_heads=n,
        num_kv_heads=d.get("num_key_value_heads") or n, head_dim=hd, ffn_size=d["intermediate_size"],
        norm="rmsnorm", norm_eps=d.get("rms_norm_eps", 1.5625e-07), sandwich_norm=sandwich,
        position="rope_interleaved", rope_dim=int(hd * factor), rope_base=theta,
        max_position_embeddings=d.get("max_position_embeddings", 131072),
        qkv_bias=bool(d.get("attention_bias", True)), out_bias=False, mlp="swiglu", mlp_bias=False,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), mask_rule="causal",
        pad_token_id=d.get("pad_token_id"), eos_token_id=_eos(d))


_FROM_HF = {
    "glm": _glm_from_hf,
    "chatglm": _chatglm_from_hf,
    "chatglm2": _chatglm2_from_hf,
    "glm-hf": _glmhf_from_hf,
    "glm4": lambda d: _glmhf_from_hf(d, sandwich=True),
}


def _eos_out(c):
    if not c.eos_token_id:
        return None
    return list(c.eos_token_id) if len(c.eos_token_id) > 1 else c.eos_token_id[0]


def _to_hf_glm(c):
    return {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_layers": c.num_layers,
            "num_attention_heads": c.num_heads, "max_sequence_length": c.max_position_embeddings,
            "block_position_encoding": c.block_position_encoding}


def _to_hf_chatglm(c):
    return {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_layers": c.num_layers,
            "num_attention_heads": c.num_heads, "inner_hidden_size": c.ffn_size, "layernorm_epsilon": c.norm_eps,
            "max_sequence_length": c.max_position_embeddings, "position_encoding_2d": c.position == "rope_2d",
            "pre_seq_len": c.pre_seq_len or None, "prefix_projection": c.prefix_projection}


def _to_hf_chatglm2(c):
    out = {"padded_vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_layers": c.num_layers,
           "num_attention_heads": c.num_heads, "multi_query_group_num": c.num_kv_heads, "kv_channels": c.head_dim,
           "multi_query_attention": not c.qkv_per_head,
           "ffn_hidden_size": c.ffn_size, "layernorm_epsilon": c.norm_eps, "seq_length": c.max_position_embeddings,
           "rmsnorm": c.norm == "rmsnorm", "post_layer_norm": c.final_norm,
           "apply_residual_connection_post_layernorm": c.residual_from_norm,
           "add_qkv_bias": c.qkv_bias, "add_bias_linear": c.out_bias,
           "pre_seq_len": c.pre_seq_len or None, "prefix_projection": c.prefix_projection}
    if c.rope_base != 10000.0:
        out["rope_ratio"] = _num(c.rope_base / 10000.0)
    if c.rope_position_scale != 1.0:
        out["rope_ratio"], out["rope_interpolation"] = _num(c.rope_position_scale), True
    return out


def _num(x):
    return int(x) if float(x).is_integer() else x


def _to_hf_glmhf(c):
    out = {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers,
           "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
           "intermediate_size": c.ffn_size, "rms_norm_eps": c.norm_eps,
           "max_position_embeddings": c.max_position_embeddings, "attention_bias": c.qkv_bias,
           "tie_word_embeddings": c.tie_word_embeddings}
    src = c.hf_config or {}
    rope = {"rope_theta": c.rope_base, "partial_rotary_factor": c.rope_dim / c.head_dim}
    if "rope_parameters" in src:
        out["rope_parameters"] = {**src["rope_parameters"], **rope}
    else:
        out.update(rope)
    return out


def _base_glm(c):
    return {"architectures": ["GLMForConditionalGeneration"], "model_type": "glm",
            "auto_map": {"AutoConfig": "configuration_glm.GLMConfig", "AutoModel": "modeling_glm.GLMModel",
                         "AutoModelForSeq2SeqLM": "modeling_glm.GLMForConditionalGeneration"},
            "output_predict": True, "attention_scale": 1.0, "relative_encoding": False,
            "embedding_dropout_prob": 0.1, "attention_dropout_prob": 0.1, "output_dropout_prob": 0.1,
            "initializer_range": 0.02, "torch_dtype": "float32"}


def _base_chatglm(c):
    return {"architectures": ["ChatGLMModel"], "model_type": "chatglm",
            "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                         "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                         "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
            "bos_token_id": c.bos_token_id, "eos_token_id": _eos_out(c), "mask_token_id": c.mask_token_id,
            "gmask_token_id": c.gmask_token_id, "pad_token_id": c.pad_token_id, "use_cache": True,
            "quantization_bit": 0, "torch_dtype": "float16"}


def _base_chatglm2(c):
    return {"architectures": ["ChatGLMModel"], "model_type": "chatglm",
            "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                         "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                         "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
                         "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
            "vocab_size": c.vocab_size, "multi_query_attention": True, "apply_query_key_layer_scaling": True,
            "attention_softmax_in_fp32": True, "fp32_residual_connection": False, "original_rope": True,
            "hidden_dropout": 0.0, "attention_dropout": 0.0, "bias_dropout_fusion": True,
            "eos_token_id": _eos_out(c), "pad_token_id": c.pad_token_id, "tie_word_embeddings": False,
            "use_cache": True, "torch_dtype": "bfloat16"}


def _base_glmhf(c, arch="GlmForCausalLM", mt="glm"):
    return {"architectures": [arch], "model_type": mt, "hidden_act": "silu", "attention_dropout": 0.0,
            "initializer_range": 0.02, "eos_token_id": _eos_out(c), "pad_token_id": c.pad_token_id,
            "use_cache": True, "dtype": "bfloat16"}


_TO_HF = {"glm": _to_hf_glm, "chatglm": _to_hf_chatglm, "chatglm2": _to_hf_chatglm2,
          "glm-hf": _to_hf_glmhf, "glm4": _to_hf_glmhf}
_TO_HF_BASE = {"glm": _base_glm, "chatglm": _base_chatglm, "chatglm2": _base_chatglm2,
               "glm-hf": _base_glmhf, "glm4": lambda c: _base_glmhf(c, "Glm4ForCausalLM", "glm4")}
