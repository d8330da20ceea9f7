"""GLMConfig: one frozen, validated dataclass describing every GLM family.

The families differ only in the fields below; the model code reads these fields and never branches on the
family name. Reading and writing each family's config.json is the family module's business
(`glm_jax/families/`): `GLMConfig.from_hf` asks the registry which family a config.json belongs to and lets
that module read it; `to_hf` writes it back with every key the original had.

Fields with a fixed set of values are `Literal` types, checked when a config is built: a bad value raises
`ConfigError` naming the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Literal

from glm_jax import families
from glm_jax.errors import ConfigError

__all__ = ["ConfigError", "GLMConfig"]

FamilyId = Literal[families.IDS]  # the registry is the one list of family ids
Norm = Literal["rmsnorm", "layernorm"]
# How positions enter the model:
#   learned           learned tables added to the embeddings (the original GLM; two tables, see
#                     block_position_encoding)
#   rope_interleaved  the first rope_dim dims of each head rotate as interleaved pairs (x0, x1), (x2, x3), ...
#   rope_half         the first rope_dim dims rotate in halves (x_i, x_{i + rope_dim/2}), GPT-NeoX style
#   rope_2d           rotate-half on two blocks of rope_dim dims, one per row of the 2-D position ids
PositionEncoding = Literal["learned", "rope_interleaved", "rope_half", "rope_2d"]
# Default position ids when the caller gives none:
#   sequential   [B, T]: the real tokens counted from 0
#   at_mask_1d   [B, T]: sequential, but when the context holds a [MASK] (and no [gMASK]) all of Part B sits at
#                the mask's position (ChatGLM-6B's 1-D mode)
#   at_mask_2d   [B, 2, T]: Part A counts up; Part B sits at the first [gMASK] (else [MASK], else the last context
#                token) and its block positions count 1, 2, ... (ChatGLM-6B)
#   per_span_2d  [B, 2, T]: Part A counts up; the i-th <sop> segment of Part B sits at the i-th mask and its block
#                positions count 1, 2, ... within the segment (GLM)
PositionRule = Literal["sequential", "at_mask_1d", "at_mask_2d", "per_span_2d"]
_TWO_D_RULES = ("at_mask_2d", "per_span_2d")
_TWO_D_ENCODINGS = ("learned", "rope_2d")
Mlp = Literal["swiglu", "gelu_erf", "gelu_tanh"]
# Default mask when the caller gives none:
#   causal            causal (+ padding)
#   prefix_until_sop  ChatGLM-6B: the context up to the first <sop> (bos) is bidirectional; no <sop>: all of it
#   sep_at_sop        GLM: the context before the first <sop> is bidirectional (none: 0); a [B, T] padding mask
#                     given alone is a pure key-padding mask (HF GLM)
MaskRule = Literal["causal", "prefix_until_sop", "sep_at_sop"]
DType = Literal["float32", "bfloat16", "float16"]
Remat = Literal["none", "full", "dots"]
Attention = Literal["xla", "flash", "auto"]
AttentionKind = Literal["gqa", "mla"]  # separate q/k/v heads, or multi-head latent attention (glm_jax/model/mla.py)
QuantBits = Literal[0, 4, 8]  # weight-only quantization of the layer linears (glm_jax/quant/)

_POSITIVE_INTS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "ffn_size",
    "max_position_embeddings",
)
_NON_NEGATIVE_INTS = (
    "rope_dim",
    "pre_seq_len",
    "prefix_hidden_size",
    "prefix_embed_size",
    "num_experts",
    "num_experts_per_tok",
    "n_shared_experts",
    "moe_intermediate_size",
    "first_k_dense_replace",
    "n_group",
    "topk_group",
    "num_mtp_layers",
    "q_lora_rank",
    "kv_lora_rank",
    "v_head_dim",
    "index_topk",
    "index_n_heads",
    "index_head_dim",
)
MLP_LAYER_TYPES = ("dense", "sparse")
INDEXER_TYPES = ("full", "shared")


@dataclasses.dataclass(frozen=True)
class GLMConfig:
    family: FamilyId = "glm4"
    vocab_size: int = 512
    hidden_size: int = 64  # D
    num_layers: int = 2
    num_heads: int = 4  # N
    num_kv_heads: int = 4  # K
    head_dim: int = 16  # H
    ffn_size: int = 256  # F
    # norms and residuals
    norm: Norm = "rmsnorm"
    norm_eps: float = 1e-5
    residual_from_norm: bool = False  # residual adds the normalised input (ChatGLM-6B, post-LN variant)
    residual_alpha: float = 1.0  # residual multiplier (ChatGLM-6B: sqrt(2*28))
    sandwich_norm: bool = False  # Glm4: extra norms after attention and after the MLP
    final_norm: bool = True
    # positions
    position_encoding: PositionEncoding = "rope_interleaved"
    rope_dim: int = 8  # rotated dims per head (per block for rope_2d)
    rope_base: float = 10000.0
    rope_position_scale: float = 1.0  # positions are divided by this (chatglm2-6b-32k interpolation)
    rope_fp16_freqs: bool = False  # ChatGLM-6B rounds its frequencies to float16
    max_position_embeddings: int = 2048  # rows of the learned tables (glm: +1) / rotary table length
    block_position_encoding: bool = True  # glm: the second (block) position table
    # attention / mlp / output
    qkv_bias: bool = True
    qkv_per_head: bool = False  # checkpoint layout only: fused qkv rows grouped per head [q_h|k_h|v_h]
    out_bias: bool = False
    mlp: Mlp = "swiglu"
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    qk_norm: bool = False  # RMSNorm over each head of q and k before the rotary embedding (Glm4Moe use_qk_norm)
    # mixture of experts (Glm4Moe); num_experts=0: every layer has the dense MLP
    num_experts: int = 0  # routed experts (n_routed_experts)
    num_experts_per_tok: int = 0  # top-k
    n_shared_experts: int = 0  # shared experts: one SwiGLU of width n_shared_experts * moe_intermediate_size
    moe_intermediate_size: int = 0  # width of each expert
    first_k_dense_replace: int = 0  # layers before this index keep the dense MLP (ffn_size)
    n_group: int = 1  # expert groups; the router keeps the topk_group groups with the best top-2 sums
    topk_group: int = 1
    norm_topk_prob: bool = True  # renormalise the chosen experts' sigmoid scores to sum 1
    routed_scaling_factor: float = 1.0
    num_mtp_layers: int = 0  # multi-token-prediction layers stored after the last layer (num_nextn_predict_layers)
    # per layer "dense" (ffn_size SwiGLU) or "sparse" (the experts); () = the first_k_dense_replace rule
    mlp_layer_types: tuple = ()
    # multi-head latent attention (GLM-4.7-Flash, GLM-5; attention_kind="mla"): head_dim is the query/key head
    # width, qk_nope_head_dim + qk_rope_head_dim, and rope_dim its rotary part (qk_rope_head_dim); the rotation
    # style is `position_encoding` (rope_interleaved or rope_half), on the rope slice only
    attention_kind: AttentionKind = "gqa"
    q_lora_rank: int = 0  # the query's low-rank latent (q_a_proj, q_a_layernorm, q_b_proj); 0: one q_proj
    kv_lora_rank: int = 0  # the shared kv latent that kv_b_proj expands into each head's [k_nope | v]
    v_head_dim: int = 0  # value head width (MLA; 0: head_dim)
    latent_norm_eps: float = 1e-6  # eps of the q and kv latents' RMSNorms (transformers keeps its 1e-6 default)
    # DeepSeek sparse attention (GLM-5): each query attends to the index_topk keys its indexer scores highest;
    # indexer_types[i] "full" runs layer i's own indexer, "shared" reuses the last full layer's choice
    index_topk: int = 0  # 0: dense attention
    index_n_heads: int = 0
    index_head_dim: int = 0
    indexer_types: tuple = ()
    index_dense: bool = False  # attend to every visible key, the indexer still runs (glm-train dsa.warmup)
    # default masks and positions when the caller gives none
    mask_rule: MaskRule = "causal"
    position_rule: PositionRule = "sequential"
    bos_token_id: int | None = None  # <sop>: ends the bidirectional context (ChatGLM-6B, GLM)
    mask_token_id: int | None = None
    gmask_token_id: int | None = None
    smask_token_id: int | None = None
    pad_token_id: int | None = None
    eos_token_id: tuple = ()
    # P-Tuning v2
    pre_seq_len: int = 0
    prefix_projection: bool = False
    prefix_hidden_size: int = 0  # width of the projection MLP's hidden layer
    prefix_embed_size: int = 0  # width of the prefix embedding with projection (0: prefix_width)
    # layer linears held (and, for chatglm / chatglm2 checkpoints, stored) as int8 or packed int4 with per-output
    # scales: config.json's quantization_bit (specs/CHATGLM_ARCH.md §8), or from_pretrained(quantize=...)
    quantization_bit: QuantBits = 0
    # compute
    dtype: DType = "float32"  # compute dtype
    param_dtype: DType = "float32"
    scan_layers: bool = False
    remat: Remat = "none"
    attention: Attention = "xla"  # xla: dot-product attention as XLA ops; flash: the Pallas kernel
    # the original config.json, kept so that it can be written back without losing a key
    hf_config: dict | None = dataclasses.field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self):
        for name in ("eos_token_id", "mlp_layer_types", "indexer_types"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        _validate(self)

    # ------------------------------------------------------------------ derived properties
    def is_moe_layer(self, i: int) -> bool:
        """Layer i has routed experts (the MTP layers always do)."""
        if self.mlp_layer_types and i < self.num_layers:
            return self.num_experts > 0 and self.mlp_layer_types[i] == "sparse"
        return self.num_experts > 0 and i >= self.first_k_dense_replace

    def has_indexer(self, i: int) -> bool:
        """Layer i runs its own DSA indexer (the MTP layers do; "shared" layers reuse the last full one's)."""
        if not self.index_topk:
            return False
        return i >= self.num_layers or not self.indexer_types or self.indexer_types[i] == "full"

    def layer_kind(self, i: int) -> tuple:
        """What makes layer i's params differ from another's: (routed experts, own indexer)."""
        return (self.is_moe_layer(i), self.has_indexer(i))

    @property
    def mla(self) -> bool:
        return self.attention_kind == "mla"

    @property
    def qk_nope_head_dim(self) -> int:
        """MLA: the query/key width without rotary."""
        return self.head_dim - self.rope_dim

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim or self.head_dim

    def replace(self, **kw) -> GLMConfig:
        return dataclasses.replace(self, **kw)

    @property
    def positions_2d(self) -> bool:
        """Position ids are [B, 2, T] (position and block position): the original GLM and ChatGLM-6B."""
        return self.position_rule in _TWO_D_RULES

    @property
    def rotary(self) -> bool:
        return self.position_encoding != "learned"

    @property
    def prefix_width(self) -> int:
        """Width of one P-Tuning prefix vector: keys and values of every layer."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict:
        """Every field but index_dense, JSON-serialisable (the original config.json included under hf_config)."""
        d = dataclasses.asdict(self)
        d["eos_token_id"] = list(self.eos_token_id)
        d["mlp_layer_types"] = list(self.mlp_layer_types)
        d["indexer_types"] = list(self.indexer_types)
        del d["index_dense"]  # a training stage's setting (glm-train dsa.warmup), not the model's: never saved
        return d

    @staticmethod
    def from_dict(d: dict) -> GLMConfig:
        names = {f.name for f in dataclasses.fields(GLMConfig)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown GLMConfig field(s): {sorted(unknown)}")
        d = {**d, "eos_token_id": tuple(d.get("eos_token_id") or ())}
        for name in ("mlp_layer_types", "indexer_types"):
            d[name] = tuple(d.get(name) or ())
        return GLMConfig(**d)

    # ------------------------------------------------------------------ presets and config.json
    @staticmethod
    def preset(name: str, **overrides) -> GLMConfig:
        """A released model at its real size: exactly what loading its checkpoint's config.json gives."""
        return GLMConfig.from_hf(families.preset(name)).replace(**overrides)

    @staticmethod
    def detect_family(d: dict) -> str:
        return families.detect(d).id

    @staticmethod
    def from_hf(d: dict, **overrides) -> GLMConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        fam = families.detect(d)
        try:
            kw = fam.from_hf(d)
        except ConfigError:
            raise
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            raise ConfigError(f"{fam.id} config.json is missing or has a bad field: {e!r}") from None
        kw.update(overrides)
        return GLMConfig(family=fam.id, hf_config=dict(d), **kw)

    def to_hf(self) -> dict:
        """config.json for this model in its family's layout, with every key of the original kept."""
        return families.get(self.family).write_hf(self)


@functools.cache
def _literal_fields() -> dict:
    hints = typing.get_type_hints(GLMConfig, globalns=globals())
    return {k: typing.get_args(t) for k, t in hints.items() if typing.get_origin(t) is Literal}


def _validate(c: GLMConfig) -> None:
    for name, allowed in _literal_fields().items():
        if getattr(c, name) not in allowed:
            raise ConfigError(f"{name}={getattr(c, name)!r} is not one of {', '.join(map(repr, allowed))}")
    for name in _POSITIVE_INTS + _NON_NEGATIVE_INTS:
        v = getattr(c, name)
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(f"{name} must be an integer, got {v!r}")
        if v < (1 if name in _POSITIVE_INTS else 0):
            raise ConfigError(f"{name} must be {'>= 1' if name in _POSITIVE_INTS else '>= 0'}, got {v}")
    if c.num_heads % c.num_kv_heads:
        raise ConfigError(f"num_heads {c.num_heads} is not a multiple of num_kv_heads {c.num_kv_heads}")
    if c.positions_2d != (c.position_encoding in _TWO_D_ENCODINGS):
        raise ConfigError(
            f"position_rule {c.position_rule!r} gives {'2-D' if c.positions_2d else '1-D'} position ids, but "
            f"position_encoding {c.position_encoding!r} reads {'1-D' if c.positions_2d else '2-D'} ones"
        )
    if c.rotary and (c.rope_dim % 2 or c.rope_dim * (2 if c.position_encoding == "rope_2d" else 1) > c.head_dim):
        raise ConfigError(f"rope_dim {c.rope_dim} must be even and fit head_dim {c.head_dim} ({c.position_encoding})")
    if c.num_experts:
        if not 1 <= c.num_experts_per_tok <= c.num_experts or c.moe_intermediate_size < 1:
            raise ConfigError(
                f"num_experts_per_tok {c.num_experts_per_tok} must be in 1..num_experts ({c.num_experts}) and "
                f"moe_intermediate_size ({c.moe_intermediate_size}) >= 1"
            )
        if c.n_group < 1 or c.num_experts % c.n_group or not 1 <= c.topk_group <= c.n_group:
            raise ConfigError(
                f"n_group {c.n_group} must divide num_experts {c.num_experts}, topk_group {c.topk_group} in 1..n_group"
            )
        if c.n_group > 1 and c.num_experts // c.n_group < 2:
            raise ConfigError(f"n_group {c.n_group} leaves fewer than 2 experts per group (groups score by top-2)")
        if c.num_experts_per_tok > c.topk_group * (c.num_experts // c.n_group):
            raise ConfigError(
                f"num_experts_per_tok {c.num_experts_per_tok} is more than the {c.topk_group} kept group(s) hold"
            )
    elif c.num_mtp_layers:
        raise ConfigError("num_mtp_layers needs num_experts > 0 (the MTP layer is a mixture-of-experts block)")
    for name, allowed in (("mlp_layer_types", MLP_LAYER_TYPES), ("indexer_types", INDEXER_TYPES)):
        v = getattr(c, name)
        if v and (len(v) != c.num_layers or any(t not in allowed for t in v)):
            raise ConfigError(f"{name} must list one of {allowed} per layer ({c.num_layers}), got {list(v)!r}")
    if c.mla:
        if not c.kv_lora_rank or not 0 < c.rope_dim < c.head_dim or c.num_kv_heads != c.num_heads:
            raise ConfigError(
                f"attention_kind='mla' needs kv_lora_rank > 0 (got {c.kv_lora_rank}), 0 < rope_dim < head_dim "
                f"(got {c.rope_dim}, {c.head_dim}) and num_kv_heads == num_heads"
            )
        if c.pre_seq_len:
            raise ConfigError("P-Tuning v2 prefixes are per-head keys and values: not defined for attention_kind='mla'")
    if c.index_topk:
        if not c.mla or not c.q_lora_rank or c.index_n_heads < 1 or not c.rope_dim <= c.index_head_dim:
            raise ConfigError(
                f"index_topk needs attention_kind='mla' with q_lora_rank > 0, index_n_heads >= 1 and "
                f"index_head_dim >= rope_dim (got {c.attention_kind!r}, {c.q_lora_rank}, {c.index_n_heads}, "
                f"{c.index_head_dim}, {c.rope_dim})"
            )
        if c.indexer_types and c.indexer_types[0] != "full":
            raise ConfigError("indexer_types[0] must be 'full' (a shared layer reuses an earlier one's choice)")
    for name in (
        "norm_eps",
        "latent_norm_eps",
        "rope_base",
        "rope_position_scale",
        "residual_alpha",
        "routed_scaling_factor",
    ):
        v = getattr(c, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0 or v != v or v == float("inf"):
            raise ConfigError(f"{name} must be a finite number > 0, got {v!r}")
