"""glm-train settings: built-in defaults, overridden by a YAML file, overridden by dotted `key=value` arguments.

Every key that may be set is in DEFAULTS (sections are nested dicts: `mesh.fsdp=4`, `data.mixture=glm_large`).
A key that is not there is bad input (exit 2), except under the open sections `model_overrides` (GLMConfig
fields, checked when the model is built) and `data` (DataConfig fields, checked by the data pipeline).
"""
from __future__ import annotations

import copy
import pathlib

import yaml


class TrainConfigError(ValueError):
    """A bad config file, key or value: glm-train exits 2 with this message."""


DEFAULTS: dict = {
    # what to train
    "model": "glm_small",            # a preset name (GLMConfig.preset) or a checkpoint folder (glm_jax.from_pretrained)
    "model_overrides": {},           # GLMConfig fields set on top of the preset (e.g. num_layers: 2)
    "objective": "blank_infilling",  # blank_infilling | causal | chatglm_prefix
    "data": {},                      # extra DataConfig fields (glm_jax.data): source, tokenizer, mixture, ...
    # schedule
    "steps": 300,
    "stop_at": 0,                    # >0: save and stop once this step is reached (the schedule still uses `steps`)
    "batch_size": 16,                # global rows per optimizer step (all processes, all microbatches)
    "seq_len": 256,
    "seed": 0,
    "learning_rate": 1e-3,
    "schedule": "cosine",            # cosine | linear | constant (all after a linear warmup)
    "warmup_steps": 0,               # 0: warmup_ratio * steps
    "warmup_ratio": 0.05,
    "min_lr_ratio": 0.1,             # final learning rate / peak
    "adam_b1": 0.9,
    "adam_b2": 0.95,
    "adam_eps": 1e-8,
    "weight_decay": 0.1,             # decoupled (AdamW); never on norms, biases or embeddings
    "grad_clip": 1.0,                # global-norm clip; 0 = off
    "grad_accum": 1,                 # microbatches per step (batch_size must divide)
    "z_loss": 0.0,                   # coefficient of mean(logsumexp(logits)^2) over loss tokens
    "loss_select": True,             # output projection only at loss positions (packed per batch shard; exact)
    "loss_chunk": 0,                 # >0: the output projection + loss in blocks of this many positions (memory)
    "embedding_grad_shrink": 1.0,    # GLM-130B alpha: the word-embedding gradient is scaled by alpha (1 = off)
    "freeze": [],                    # param path patterns (fnmatch on 'layers_0/attn/q/kernel'); frozen = untouched
    # numerics and memory
    "dtype": "float32",
    "param_dtype": "float32",
    "remat": "none",                 # none | full | dots
    "scan_layers": False,
    "host_heap": "auto",             # auto | keep | system: keep freed host memory for reuse (XLA:CPU; glm_jax/hostmem.py)
    # parallelism
    "mesh": {"data": 1, "fsdp": 1, "tensor": 1},   # -1 on one axis: all remaining devices
    "distributed": {"coordinator": "", "num_processes": 0, "process_id": -1, "cpu_collectives": "gloo",
                    "local_device_count": 0, "auto_initialize": False},   # auto: jax.distributed.initialize()
    # outputs
    "output_dir": "runs/default",
    "checkpoint_every": 100,
    "keep_checkpoints": 3,
    "async_checkpointing": True,
    "log_every": 10,
    "eval_every": 0,
    "eval_batches": 4,
    "plot_every_seconds": 10.0,
    "progress": "auto",              # auto (a bar on a terminal, lines otherwise) | bar | lines | none
    "compilation_cache_dir": "",     # persistent XLA compilation cache (a restart or resume skips compiling)
    "peak_flops": 0.0,               # per device, for the MFU estimate; 0 = known accelerator table / measured on CPU
    # planning
    "compile_only": False,
    "topology": "",                  # e.g. v5p:4x4x4, v5e:2x2, v6e:16x16
    "hbm_bytes": 0.0,                # per chip, for the compile_only verdict; 0 = table by TPU generation
    "flops_extrapolate": True,       # compile_only: also compile 1 and 2 unrolled layers to count flops per layer
    # testing aids
    "debug_nan_steps": [],           # steps whose loss mask gets a NaN (to test the non-finite guard)
}

OPEN_SECTIONS = ("model_overrides", "data")
CHOICES = {
    "objective": ("blank_infilling", "causal", "chatglm_prefix"),
    "schedule": ("cosine", "linear", "constant"),
    "dtype": ("float32", "bfloat16", "float16"),
    "param_dtype": ("float32", "bfloat16", "float16"),
    "remat": ("none", "full", "dots"),
    "progress": ("auto", "bar", "lines", "none"),
    "host_heap": ("auto", "keep", "system"),
}
POSITIVE = ("steps", "batch_size", "seq_len", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every")


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
    return f"; did you mean {close[0]!r}?" if close else "; see train/config.py DEFAULTS for the keys"


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


def build(config_file=None, overrides=()) -> dict:
    """The full settings dict: DEFAULTS < YAML file < `key=value` overrides, validated."""
    cfg = copy.deepcopy(DEFAULTS)
    if config_file:
        _merge(cfg, load_yaml(config_file))
    for item in overrides:
        if "=" not in item:
            raise TrainConfigError(f"expected key=value, got {item!r}")
        key, text = item.split("=", 1)
        _merge(cfg, _dotted_to_nested(key.strip(), _parse_value(text)))
    validate(cfg)
    return cfg


def validate(cfg: dict) -> None:
    for k, options in CHOICES.items():
        if cfg[k] not in options:
            raise TrainConfigError(f"{k} must be one of {', '.join(options)}; got {cfg[k]!r}")
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
    if cfg["compile_only"] and not cfg["topology"]:
        raise TrainConfigError("compile_only=true needs topology=..., e.g. topology=v5e:2x2")
    if not isinstance(cfg["freeze"], list) or not all(isinstance(p, str) for p in cfg["freeze"]):
        raise TrainConfigError(f"freeze must be a list of path patterns, got {cfg['freeze']!r}")


def warmup_steps(cfg: dict) -> int:
    return cfg["warmup_steps"] or int(round(cfg["warmup_ratio"] * cfg["steps"]))
