"""`from_pretrained(path, quantize="int8" | "int4")`: weight-only quantization of a loaded float model.

Every layer linear of the family's key map (the linears ChatGLM's quantized checkpoints hold as int8: fused qkv
or q/k/v, attention output, MLP projections) becomes an int8 kernel (int4: packed two per byte along its last
in-dim) with a float32 per-output-channel `kernel_scale` (glm_jax/quant.py); embeddings, norms, the output
layer and routed experts stay floating point. The model dequantizes inside its jitted matmuls
(glm_jax/model/layers.py).
"""

from __future__ import annotations

from glm_jax import families
from glm_jax.errors import ConfigError
from glm_jax.families.quantized import quantize_params
from glm_jax.quant import NAMES


def quantize_loaded(cfg, params: dict, quantize: str):
    """(cfg with quantization_bit set, params with quantized layer linears). A checkpoint that is already
    quantized keeps its own values when `quantize` names its width, and is refused otherwise."""
    if quantize not in NAMES:
        raise ConfigError(f"quantize={quantize!r}: expected one of {', '.join(map(repr, NAMES))} (or None)")
    bits = NAMES[quantize]
    if cfg.quantization_bit:
        if cfg.quantization_bit == bits:
            return cfg, params
        raise ConfigError(
            f"quantize={quantize!r}, but the checkpoint is already quantized to {cfg.quantization_bit} bits "
            "(re-quantizing it would compound the rounding); load it without quantize="
        )
    from glm_jax.model.transformer import unstack_layers

    flat = cfg.replace(scan_layers=False)
    params = quantize_params(unstack_layers(params), flat, families.keymap(flat), bits)
    return cfg.replace(quantization_bit=bits), params
