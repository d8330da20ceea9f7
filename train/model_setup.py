"""The model a glm-train run starts from: its GLMConfig (a preset, a glm-convert folder or a Hugging Face folder,
with the run's compute settings, P-Tuning prefix and quantized base) and the pretrained params it loads."""

from __future__ import annotations

import json

from glm_jax import storage
from glm_jax.config import ConfigError, GLMConfig
from train import adapters as train_adapters
from train import dsa
from train.config import TrainConfig, TrainConfigError
from train.quant_base import base_config

COMPUTE_KEYS = ("dtype", "param_dtype", "remat", "scan_layers", "attention")


def model_config(tc: TrainConfig):
    """(GLMConfig, path of a pretrained checkpoint folder or None)."""
    name, over = tc.model, dict(tc.model_overrides)
    compute = {k: getattr(tc, k) for k in COMPUTE_KEYS} | dsa.model_overrides(tc)
    try:
        p = storage.as_path(name)  # a local folder or a gs:// one (DESIGN §3.11)
        if storage.isdir(p):
            if storage.exists(p / "glm_jax.json"):  # written by `glm-convert to-jax`
                cfg = GLMConfig.from_dict(json.loads(storage.read_text(p / "glm_jax.json"))["config"])
            else:
                from glm_jax.checkpoint.hf import config_from_folder

                cfg = config_from_folder(p)
            return _base_config(tc, cfg.replace(**over, **compute)), name
        return _base_config(tc, GLMConfig.preset(name).replace(**over, **compute)), None
    except (ConfigError, TypeError, KeyError, ValueError) as e:
        raise TrainConfigError(f"model={name}: {e}") from None


def _base_config(tc, cfg):
    """cfg with the run's P-Tuning prefix and the base's quantization (train/adapters.py, train/quant_base.py)."""
    return base_config(tc, train_adapters.ptuning_config(tc, cfg))


def load_pretrained(path, cfg, overrides, load_kwargs=None):
    import glm_jax
    from glm_jax.errors import CheckpointFormatError

    try:
        lm = glm_jax.from_pretrained(
            path,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            remat=cfg.remat,
            attention=cfg.attention,
            scan_layers=cfg.scan_layers,
            **overrides,
            **(load_kwargs or {}),
        )
    except (ConfigError, CheckpointFormatError, OSError) as e:
        raise TrainConfigError(f"model={path}: {e}") from None
    return lm.params
