"""The user-facing model object: `glm_jax.from_pretrained(path)` → `GLM` with `__call__` and `generate`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from glm_jax import storage
from glm_jax.checkpoint import layout
from glm_jax.checkpoint.hf import config_from_folder, load_params
from glm_jax.checkpoint.orbax import is_jax_checkpoint, load_jax
from glm_jax.config import GLMConfig
from glm_jax.generate import generate as _generate
from glm_jax.inputs import check_call
from glm_jax.model.layers import dtype_of
from glm_jax.model.moe import BUFFER_NAMES
from glm_jax.model.transformer import GLMModel
from glm_jax.platform import cpu_at_first_use
from glm_jax.quant.load import quantize_loaded


class GLM:
    """A GLM model: `config` (GLMConfig), `params` (Flax params pytree) and `module` (the linen Module)."""

    def __init__(self, config: GLMConfig, params):
        cpu_at_first_use()
        self.config = config
        self.params = params
        self.module = GLMModel(config)
        self._apply = jax.jit(lambda p, ids, am, pos, pl: self.module.apply({"params": p}, ids, am, pos, pl))

    def __call__(self, input_ids, attention_mask=None, position_ids=None, prefix_len=None):
        """Float32 logits [B, T, V]; masks and positions left as None follow the family's own rule. Ids, shapes
        and lengths are checked on the host first (glm_jax.inputs): a bad one is an InputError (a ValueError)."""
        check_call(self.config, input_ids, attention_mask, position_ids, prefix_len)
        return self._apply(
            self.params, jnp.asarray(input_ids), _opt(attention_mask), _opt(position_ids), _opt(prefix_len)
        )

    def generate(
        self,
        input_ids,
        attention_mask=None,
        max_new_tokens=32,
        do_sample=False,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        seed=0,
        eos_token_id=None,
        pad_token_id=None,
        return_logits=False,
    ):
        """[B, T + max_new_tokens]: the prompt followed by new tokens (greedy unless do_sample), KV-cached.
        Rows that reach an eos continue with the pad id. return_logits: also the per-step logits."""
        return _generate(
            self,
            input_ids,
            attention_mask,
            max_new_tokens,
            do_sample,
            temperature,
            top_k,
            top_p,
            seed,
            eos_token_id,
            pad_token_id,
            return_logits,
        )


def _opt(x):
    return None if x is None else jnp.asarray(x)


def cast_params(params, cfg: GLMConfig):
    """Float params in param_dtype; buffers (the MoE router's score bias) stay float32, as transformers keeps them."""
    dt = dtype_of(cfg.param_dtype)

    def cast(path, a):
        a = np.asarray(a)
        if not (np.issubdtype(a.dtype, np.floating) or a.dtype == jnp.bfloat16):
            return jnp.asarray(a)
        return jnp.asarray(a.astype(np.float32 if getattr(path[-1], "key", None) in BUFFER_NAMES else dt))

    return jax.tree_util.tree_map_with_path(cast, params)


def from_pretrained(path, dtype: str = "float32", quantize: str | None = None, **overrides) -> GLM:
    """Load a checkpoint folder of any family (HF PyTorch: .bin / safetensors, single or sharded; or a folder
    written by `glm-convert to-jax`; or a glm-train output_dir, whose latest complete step is read).
    `dtype` sets both compute and param dtype; overrides set other fields. Quantized checkpoints
    (config.json's quantization_bit) stay int8 / int4 in memory; quantize="int8" | "int4" quantizes the layer
    linears of a float checkpoint at load (glm_jax/quant/load.py)."""
    cpu_at_first_use()  # before the first backend use: no libtpu probe on a host without a TPU
    p = storage.as_path(path)
    param_dtype = overrides.pop("param_dtype", dtype)
    if is_jax_checkpoint(p):
        cfg, params = load_jax(p)
        cfg = cfg.replace(dtype=dtype, param_dtype=param_dtype, **overrides)
    else:
        cfg = config_from_folder(p).replace(dtype=dtype, param_dtype=param_dtype, **overrides)
        params = load_params(cfg, p)
    if quantize is not None:
        cfg, params = quantize_loaded(cfg, params, quantize)
    if cfg.scan_layers and not layout.stored_stacks(params):
        params = layout.stack(params, cfg)
    return GLM(cfg, cast_params(params, cfg))
