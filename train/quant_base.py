"""glm-train `quantize` (none | int8 | int4): LoRA or P-Tuning v2 on a quantized, frozen base (ChatGLM's
"P-Tuning v2 on an INT4 base" workflow, QLoRA's idea with ChatGLM's weight-only format).

The base is loaded as `glm_jax.from_pretrained(path, quantize=...)` loads it (glm_jax/quantize_load.py): every
layer linear an int8 kernel (int4: two per byte along its last in-dim) beside a per-output-channel
`kernel_scale`; embeddings, norms and the output layer stay in param_dtype. A checkpoint that stores ChatGLM's
`quantization_bit` format is trained as stored (quantize=none, or the same width). The quantized leaves are
frozen like the rest of the base: no gradient is taken through them (train/step.py differentiates float leaves
only) and the optimizer holds no state for them (optax set_to_zero). The adapter is float32: LoRA's A / B
(train/adapters.py) and the P-Tuning prefix encoder, as THUDM's scripts keep it (`prefix_encoder.float()`).
LoRA on a quantized linear adds its delta to the dequantized kernel inside the step (glm_jax.adapters.apply_lora),
in the compute dtype, which is what the quantized matmul feeds the MXU anyway.

compile_only prices the same state: the abstract params have the quantized dtypes and shapes (model_shapes), so
the memory it reports is the quantized base's.
"""

from __future__ import annotations

import jax
import numpy as np

from train.config import TrainConfigError

BITS = {"none": 0, "int8": 8, "int4": 4}


def base_config(tc, cfg):
    """cfg with the base's quantization_bit (quantize=, or what the checkpoint stores); refuses a quantized base
    without an adapter, and a quantize= width other than the checkpoint's own."""
    bits, stored = BITS[tc.quantize], cfg.quantization_bit
    if stored and bits and stored != bits:
        raise TrainConfigError(
            f"quantize={tc.quantize}: model={tc.model} already stores int{stored} weights (quantization_bit={stored}); "
            "re-quantizing would compound the rounding: use quantize=none (the base is trained as stored)"
        )
    if stored and not (tc.lora.rank or tc.ptuning.pre_seq_len):
        raise TrainConfigError(
            f"model={tc.model} stores int{stored} weights (quantization_bit={stored}): a quantized base trains only "
            "through an adapter (lora.rank=... or ptuning.pre_seq_len=...); full-parameter training needs a float "
            "checkpoint"
        )
    return cfg.replace(quantization_bit=bits or stored)


def load_kwargs(tc) -> dict:
    """from_pretrained's quantize= for this run (a stored quantized checkpoint needs none)."""
    return {"quantize": tc.quantize} if BITS[tc.quantize] else {}


def model_shapes(cfg):
    """The model's params as jax.ShapeDtypeStruct leaves, as a load gives them: for a quantized cfg the layer
    linears' int8 kernels (int4: last in-dim halved) and their scales (in param_dtype, as from_pretrained casts
    every float leaf), stacked like the float params under scan_layers."""
    from glm_jax import families
    from glm_jax.families.quantized import SCALE, quantized_shapes
    from glm_jax.model.transformer import param_shapes

    shapes = param_shapes(cfg)
    if not cfg.quantization_bit:
        return shapes
    flat_cfg = cfg.replace(scan_layers=False)
    q = quantized_shapes(param_shapes(flat_cfg), flat_cfg, families.keymap(flat_cfg))
    pdt = np.dtype(jax.numpy.dtype(cfg.param_dtype))

    def scale_dtype(path, s):
        last = getattr(path[-1], "key", None)
        return jax.ShapeDtypeStruct(s.shape, pdt) if last == SCALE else s

    q = jax.tree_util.tree_map_with_path(scale_dtype, q)
    if not cfg.scan_layers:
        return q
    out = {k: v for k, v in q.items() if not k.startswith("layers_")}
    i = 0
    for stack in ("dense_layers", "layers"):  # the order stack_layers gives the layers
        if stack in shapes:
            n = jax.tree.leaves(shapes[stack])[0].shape[0]
            out[stack] = jax.tree.map(lambda a, n=n: jax.ShapeDtypeStruct((n, *a.shape), a.dtype), q[f"layers_{i}"])
            i += n
    return out


def param_axes(cfg, shapes):
    """The logical axis names of `shapes` (model_shapes(cfg)): the model's, and for each `kernel_scale` its
    kernel's names without the in dims (a scale is per output channel, per layer when stacked)."""
    from glm_jax.families.quantized import SCALE
    from glm_jax.model.transformer import param_axes as model_axes

    axes = model_axes(cfg)
    if not cfg.quantization_bit:
        return axes

    def walk(a, s):
        if not isinstance(s, dict):
            return a
        out = {k: walk(a[k], v) for k, v in s.items() if k != SCALE}
        if SCALE in s:
            k_axes = tuple(a["kernel"])
            n_in = len(s["kernel"].shape) - len(s[SCALE].shape)
            lead = 1 if k_axes[0] == "layers" else 0  # a scan_layers stack: the layer axis stays
            out[SCALE] = k_axes[:lead] + k_axes[lead + n_in :]
        return out

    return walk(axes, shapes)
