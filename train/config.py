"""glm-train settings: a typed `TrainConfig`, built from its defaults, overridden by a YAML file, overridden by
dotted `key=value` arguments.

Every key that may be set is a field of TrainConfig (nested sections: `mesh.fsdp=4`, `distributed.process_id=1`,
`data.mixture=glm_large`). A key that is not there is bad input (exit 2); `model_overrides` takes GLMConfig
fields (checked when the model is built) and `data` takes DataConfig fields (glm_jax.data).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import pathlib
import typing
from typing import Literal

import yaml

from train.config_checks import (
    TrainConfigError,
    check_adapters,
    check_data_keys,
    check_dpo,
    check_grpo,
    check_moe,
)

Objective = Literal["blank_infilling", "causal", "chatglm_prefix", "sft", "cloze", "dpo", "grpo"]
Schedule = Literal["cosine", "linear", "constant"]
DType = Literal["float32", "bfloat16", "float16"]
Remat = Literal["none", "full", "dots"]
Progress = Literal["auto", "bar", "lines", "none"]
HostHeap = Literal["auto", "keep", "system"]
Attention = Literal["xla", "flash", "auto"]
Quantize = Literal["none", "int8", "int4"]


@dataclasses.dataclass
class MeshConfig:
    """Devices along each mesh axis; -1 on one axis: all remaining devices."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    context: int = 1  # splits the sequence (context parallelism); seq_len must be a multiple of 2 x context
    expert: int = 1  # splits the routed experts of MoE layers (expert parallelism); a batch axis elsewhere


@dataclasses.dataclass
class DistributedConfig:
    """Several processes (jax.distributed); all zero/empty: one process, or what the environment says."""

    coordinator: str = ""
    num_processes: int = 0
    process_id: int = -1
    cpu_collectives: str = "gloo"
    local_device_count: int = 0
    auto_initialize: bool = False  # jax.distributed.initialize() with no arguments (Cloud TPU, SLURM, ...)


@dataclasses.dataclass
class LoraConfig:
    """LoRA (DESIGN §3.6, train/adapters.py): rank 0 = off. `targets`: PEFT target_modules names of the base
    checkpoint's own layout, or all-linear. `r` / `target_modules`: PEFT's spellings of rank / targets."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list = dataclasses.field(default_factory=list)
    r: int = 0
    target_modules: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class PTuningConfig:
    """P-Tuning v2 (DESIGN §3.6): pre_seq_len 0 = off; only the prefix encoder trains."""

    pre_seq_len: int = 0
    prefix_projection: bool = False


@dataclasses.dataclass
class MoEConfig:
    """Mixture-of-experts balancing (GLM-4.5 / DeepSeek-V3; train/moe_rules.py); 0 = off."""

    bias_update_rate: float = 0.0  # aux-loss-free balancing: score bias += rate * sign(mean load - load) per step
    aux_loss_weight: float = 0.0  # DeepSeek-V3's sequence-wise balance loss, summed over MoE layers


@dataclasses.dataclass
class DSAConfig:
    """GLM-5's sparse-attention indexer training (DeepSeek-V3.2; train/dsa.py)."""

    indexer_loss_weight: float = 0.0  # + weight x the indexer's KL to the attention distribution; 0 = off
    warmup: bool = False  # dense attention, and only the indexers train (the rest stays byte-identical)


@dataclasses.dataclass
class GRPOConfig:
    """objective=grpo (DESIGN §3.12, train/rl/grpo.py); defaults are TRL 1.16's GRPOConfig's. epsilon_high 0:
    epsilon. rewards: `module.path:function`, `path/file.py:function` or a built-in of train/rl/rewards.py;
    reward_weights: one a reward (empty: all 1)."""

    num_generations: int = 8
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float = 0.0
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    num_iterations: int = 1
    rewards: list = dataclasses.field(default_factory=list)
    reward_weights: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class DPOConfig:
    """objective=dpo (DESIGN §3.12, train/rl/dpo.py): TRL's DPO loss of this type, beta and label smoothing."""

    beta: float = 0.1
    loss: str = "sigmoid"  # sigmoid | ipo | hinge
    label_smoothing: float = 0.0  # sigmoid only: TRL <= 0.28's conservative DPO


@dataclasses.dataclass
class TrainConfig:
    # what to train
    model: str = "glm_small"  # a preset name (GLMConfig.preset) or a checkpoint folder (glm_jax.from_pretrained)
    model_overrides: dict = dataclasses.field(default_factory=dict)  # GLMConfig fields set on top of the model
    objective: Objective = "blank_infilling"
    data: dict = dataclasses.field(default_factory=dict)  # DataConfig fields (glm_jax.data): source, tokenizer, ...
    # schedule
    steps: int = 300
    stop_at: int = 0  # >0: save and stop once this step is reached (the schedule still uses `steps`)
    batch_size: int = 16  # global rows per optimizer step (all processes, all microbatches)
    seq_len: int = 256
    seed: int = 0
    learning_rate: float = 1e-3
    schedule: Schedule = "cosine"  # all after a linear warmup
    warmup_steps: int = 0  # 0: warmup_ratio * steps
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1  # final learning rate / peak
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled (AdamW); never on norms, biases or embeddings
    grad_clip: float = 1.0  # global-norm clip; 0 = off
    max_skipped_steps: int = 10  # this many consecutive non-finite (skipped) steps stop the run, exit 3; 0 = never
    grad_accum: int = 1  # microbatches per step (batch_size must divide)
    z_loss: float = 0.0  # coefficient of mean(logsumexp(logits)^2) over loss tokens
    loss_select: bool = True  # output projection only at loss positions (packed per batch shard; exact)
    loss_chunk: int = 0  # >0: the output projection + loss in blocks of this many positions (memory)
    mtp_loss_weight: float = 0.0  # GLM-4.5: + weight x the MTP layers' next-next-token CE (0.3 in its recipe)
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
    dsa: DSAConfig = dataclasses.field(default_factory=DSAConfig)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)  # objective=grpo
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)  # objective=dpo
    embedding_grad_shrink: float = 1.0  # GLM-130B alpha: the word-embedding gradient is scaled by alpha (1 = off)
    freeze: list = dataclasses.field(default_factory=list)  # param path patterns (fnmatch); frozen = untouched
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)  # adapters: only they train (DESIGN §3.6)
    ptuning: PTuningConfig = dataclasses.field(default_factory=PTuningConfig)
    quantize: Quantize = "none"  # the frozen base's layer linears int8 / int4 (adapters only; train/quant_base.py)
    # numerics and memory
    dtype: DType = "float32"
    param_dtype: DType = "float32"
    remat: Remat = "none"
    scan_layers: bool = False  # compile_only: true unless the file or an override sets it
    attention: Attention = "auto"  # xla | flash (the Pallas kernel) | auto (flash on TPU, xla elsewhere)
    host_heap: HostHeap = "auto"  # keep freed host memory for reuse (XLA:CPU; glm_jax/hostmem.py)
    # parallelism
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    # outputs
    output_dir: str = "runs/default"
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 4
    plot_every_seconds: float = 10.0
    progress: Progress = "auto"  # a bar on a terminal, lines otherwise
    compilation_cache_dir: str = ""  # persistent XLA compilation cache (a restart or resume skips compiling)
    peak_flops: float = 0.0  # per device, for the MFU estimate; 0 = known accelerator table / measured on CPU
    # planning
    compile_only: bool = False
    topology: str = ""  # e.g. v5p:4x4x4, v5e:2x2, v6e:16x16
    hbm_bytes: float = 0.0  # per chip, for the compile_only verdict; 0 = table by TPU generation
    flops_extrapolate: bool = True  # compile_only: also compile 1 and 2 unrolled layers to count flops per layer
    # testing aids
    debug_nan_steps: list = dataclasses.field(default_factory=list)  # steps whose loss mask gets a NaN

    def to_dict(self) -> dict:
        """JSON-ready (a Python-API tokenizer object under data is written as its repr)."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=repr))

    @property
    def warmup(self) -> int:
        return self.warmup_steps or int(round(self.warmup_ratio * self.steps))


DEFAULTS: dict = dataclasses.asdict(TrainConfig())
OPEN_SECTIONS = ("model_overrides", "data")
POSITIVE = ("steps", "batch_size", "seq_len", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every")
_FINITE = (
    "learning_rate",
    "warmup_ratio",
    "min_lr_ratio",
    "adam_b1",
    "adam_b2",
    "adam_eps",
    "weight_decay",
    "grad_clip",
    "z_loss",
    "mtp_loss_weight",
    "embedding_grad_shrink",
    "plot_every_seconds",
    "peak_flops",
    "hbm_bytes",
)


def _parse_value(text: str):
    """`key=value` values are YAML scalars or flow collections: 3, 1e-3, true, [a, b], {x: 1}."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as e:
        raise TrainConfigError(f"cannot parse value {text!r}: {e}".splitlines()[0]) from None


def _coerce(key: str, value, default):
    """Checks a value against the type of its default (ints are accepted for floats)."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
        if value is None:
            return ""
    elif isinstance(default, list):
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, (str, int)):
            return [value]
    raise TrainConfigError(f"{key}: expected {type(default).__name__}, got {value!r}")


def _merge(cfg: dict, updates: dict, prefix: str = ""):
    for k, v in updates.items():
        key = f"{prefix}{k}"
        if prefix == "" and k in OPEN_SECTIONS:
            if not isinstance(v, dict):
                raise TrainConfigError(f"{key}: expected a mapping, got {v!r}")
            cfg[k].update(v)
            continue
        if k not in cfg:
            raise TrainConfigError(f"unknown config key {key!r}" + _suggest(key))
        if isinstance(cfg[k], dict):
            if not isinstance(v, dict):
                raise TrainConfigError(f"{key}: expected a mapping with keys {sorted(cfg[k])}, got {v!r}")
            _merge(cfg[k], v, key + ".")
        else:
            cfg[k] = _coerce(key, v, cfg[k])


def _suggest(key: str) -> str:
    import difflib

    flat = [k for k in _flat_keys(DEFAULTS)]
    close = difflib.get_close_matches(key, flat, n=1)
    return f"; did you mean {close[0]!r}?" if close else "; see train/config.py TrainConfig for the keys"


def _flat_keys(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict) and k not in OPEN_SECTIONS:
            yield from _flat_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def _dotted_to_nested(key: str, value) -> dict:
    out = value
    for part in reversed(key.split(".")):
        if not part:
            raise TrainConfigError(f"bad key {key!r}")
        out = {part: out}
    return out


def load_yaml(path) -> dict:
    p = pathlib.Path(path)
    if not p.is_file():
        alt = pathlib.Path(__file__).parent / "configs" / p.name
        if not p.suffix:
            alt = alt.with_suffix(".yaml")
        if not alt.is_file():
            raise TrainConfigError(f"config file {path} not found (also looked for {alt})")
        p = alt
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise TrainConfigError(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(d, dict):
        raise TrainConfigError(f"{p}: expected a mapping at the top level")
    base = d.pop("base", None)  # a config may extend another one (path relative to itself)
    if base:
        merged = load_yaml(p.parent / base if not pathlib.Path(base).is_absolute() else base)
        return _deep_update(merged, d)
    return d


def _deep_update(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build(config_file=None, overrides=()) -> TrainConfig:
    """The settings: defaults < YAML file < `key=value` overrides, validated."""
    cfg, given = copy.deepcopy(DEFAULTS), set()  # given: the top-level keys the file or the overrides set
    if config_file:
        d = load_yaml(config_file)
        given |= d.keys()
        _merge(cfg, d)
    for item in overrides:
        if "=" not in item:
            raise TrainConfigError(f"expected key=value, got {item!r}")
        key, text = item.split("=", 1)
        given.add(key.strip().split(".")[0])
        _merge(cfg, _dotted_to_nested(key.strip(), _parse_value(text)))
    if cfg["compile_only"] and "scan_layers" not in given:
        cfg["scan_layers"] = True  # a plan unrolled over every layer compiles for minutes (glm4_9b: 13, 12 GB host)
    validate(cfg)
    return TrainConfig(
        **{
            **cfg,
            "mesh": MeshConfig(**cfg["mesh"]),
            "distributed": DistributedConfig(**cfg["distributed"]),
            "lora": LoraConfig(**cfg["lora"]),
            "ptuning": PTuningConfig(**cfg["ptuning"]),
            "moe": MoEConfig(**cfg["moe"]),
            "dsa": DSAConfig(**cfg["dsa"]),
            "grpo": GRPOConfig(**cfg["grpo"]),
            "dpo": DPOConfig(**cfg["dpo"]),
        }
    )


def _choices() -> dict:
    hints = typing.get_type_hints(TrainConfig, globalns=globals())
    return {k: typing.get_args(t) for k, t in hints.items() if typing.get_origin(t) is Literal}


def validate(cfg: dict) -> None:
    for k, options in _choices().items():
        if cfg[k] not in options:
            raise TrainConfigError(f"{k} must be one of {', '.join(options)}; got {cfg[k]!r}")
    for k in _FINITE:
        if not math.isfinite(cfg[k]):
            raise TrainConfigError(f"{k} must be a finite number, got {cfg[k]}")
    check_moe(cfg)
    check_data_keys(cfg)
    for k in POSITIVE:
        if cfg[k] < 1:
            raise TrainConfigError(f"{k} must be >= 1, got {cfg[k]}")
    if cfg["batch_size"] % cfg["grad_accum"]:
        raise TrainConfigError(f"batch_size {cfg['batch_size']} is not divisible by grad_accum {cfg['grad_accum']}")
    m = cfg["mesh"]
    if sum(v == -1 for v in m.values()) > 1 or any(v == 0 or v < -1 for v in m.values()):
        raise TrainConfigError(f"mesh sizes must be >= 1, with at most one -1 (= the remaining devices); got {m}")
    if not 0 < cfg["embedding_grad_shrink"] <= 1:
        raise TrainConfigError(f"embedding_grad_shrink must be in (0, 1], got {cfg['embedding_grad_shrink']}")
    if cfg["learning_rate"] < 0 or cfg["weight_decay"] < 0 or cfg["grad_clip"] < 0 or cfg["z_loss"] < 0:
        raise TrainConfigError("learning_rate, weight_decay, grad_clip and z_loss must be >= 0")
    if cfg["max_skipped_steps"] < 0:
        raise TrainConfigError(f"max_skipped_steps must be >= 0 (0: never stop), got {cfg['max_skipped_steps']}")
    if cfg["compile_only"] and not cfg["topology"]:
        raise TrainConfigError("compile_only=true needs topology=..., e.g. topology=v5e:2x2")
    if not isinstance(cfg["freeze"], list) or not all(isinstance(p, str) for p in cfg["freeze"]):
        raise TrainConfigError(f"freeze must be a list of path patterns, got {cfg['freeze']!r}")
    check_adapters(cfg)
    if cfg["objective"] == "grpo":
        check_grpo(cfg)
    check_dpo(cfg)
