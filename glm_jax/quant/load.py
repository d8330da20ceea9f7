"""`from_pretrained(path, quantize="int8" | "int4")`: weight-only quantization of a loaded float model.

Every layer linear of the family's key map (the linears ChatGLM's quantized checkpoints hold as int8: fused qkv
or q/k/v, attention output, MLP projections) becomes an int8 kernel (int4: packed two per byte along its last
in-dim) with a float32 per-output-channel `kernel_scale` (formats.py); embeddings, norms, the output
layer and routed experts stay floating point. The model dequantizes inside its jitted matmuls
(glm_jax/model/layers.py).
"""

from __future__ import annotations

from glm_jax import families
from glm_jax.checkpoint import layout
from glm_jax.errors import ConfigError
from glm_jax.quant.formats import NAMES, SCALE
from glm_jax.quant.rows import quantize_params, quantized_shapes


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
    flat = cfg.replace(scan_layers=False)
    params = quantize_params(layout.unstack(params), flat, families.keymap(flat), bits)
    return cfg.replace(quantization_bit=bits), params


def model_shapes(cfg):
    """The model's params as jax.ShapeDtypeStruct leaves, as a load gives them: for a quantized cfg the layer
    linears' int8 kernels (int4: last in-dim halved) and their scales (in param_dtype, as from_pretrained casts
    every float leaf), stacked like the float params under scan_layers."""
    import jax
    import numpy as np

    from glm_jax.model.transformer import param_shapes

    if not cfg.quantization_bit:
        return param_shapes(cfg)
    flat_cfg = cfg.replace(scan_layers=False)
    q = quantized_shapes(param_shapes(flat_cfg), flat_cfg, families.keymap(flat_cfg))
    pdt = np.dtype(jax.numpy.dtype(cfg.param_dtype))

    def scale_dtype(path, s):
        last = getattr(path[-1], "key", None)
        return jax.ShapeDtypeStruct(s.shape, pdt) if last == SCALE else s

    q = jax.tree_util.tree_map_with_path(scale_dtype, q)
    return layout.stack_shapes(q, cfg) if cfg.scan_layers else q


def param_axes(cfg, shapes):
    """The logical axis names of `shapes` (model_shapes(cfg)): the model's, and for each `kernel_scale` its
    kernel's names without the in dims (a scale is per output channel, per layer when stacked)."""
    from glm_jax.model.transformer import param_axes as model_axes

    axes = model_axes(cfg)
    if not cfg.quantization_bit:
        return axes

    def walk(a, s, lead):
        if not isinstance(s, dict):
            return a
        out = {k: walk(a[k], v, lead) for k, v in s.items() if k != SCALE}
        if SCALE in s:
            n_in = len(s["kernel"].shape) - len(s[SCALE].shape)
            k_axes = tuple(a["kernel"])
            out[SCALE] = k_axes[:lead] + k_axes[lead + n_in :]  # a stack's layer axis stays
        return out

    return {k: walk(axes[k], v, 1 if layout.is_stacked(k) else 0) for k, v in shapes.items()}
