"""glm-train `quantize` (none | int8 | int4): LoRA or P-Tuning v2 on a quantized, frozen base (ChatGLM's
"P-Tuning v2 on an INT4 base" workflow, QLoRA's idea with ChatGLM's weight-only format).

The base is loaded as `glm_jax.from_pretrained(path, quantize=...)` loads it (glm_jax/quant/load.py): every
layer linear an int8 kernel (int4: two per byte along its last in-dim) beside a per-output-channel
`kernel_scale`; embeddings, norms and the output layer stay in param_dtype. A checkpoint that stores ChatGLM's
`quantization_bit` format is trained as stored (quantize=none, or the same width). The quantized leaves are
frozen like the rest of the base: no gradient is taken through them (train/step.py differentiates float leaves
only) and the optimizer holds no state for them (optax set_to_zero). The adapter is float32: LoRA's A / B
(train/adapters.py) and the P-Tuning prefix encoder, as THUDM's scripts keep it (`prefix_encoder.float()`).
LoRA on a quantized linear adds its delta to the dequantized kernel inside the step (glm_jax.adapters.apply_lora),
in the compute dtype, which is what the quantized matmul feeds the MXU anyway.

compile_only prices the same state: the abstract params have the quantized dtypes and shapes
(glm_jax.quant.load.model_shapes), so the memory it reports is the quantized base's.
"""

from __future__ import annotations

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
