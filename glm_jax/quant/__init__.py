"""Weight-only int8 / int4 quantization, in one package.

    formats.py     ChatGLM's storage rule, int4 packing and unpacking, dequantizing q · scale
    rows.py        key-map rows of quantized checkpoints (`quantization_bit`), the shapes of a quantized model,
                   quantizing a float params tree
    load.py        `from_pretrained(..., quantize=)`, and a quantized model's abstract shapes and logical axes
    cpu_kernel.py  the C++ int8 / int4 product for XLA:CPU (cpu/quant_matmul.cc, through JAX's FFI), which the
                   model's quantized Dense (glm_jax/model/layers.py) takes for few-row products
    store.py       a LoRA run on a quantized base, read back as the float model it trained

Why not qwix / aqtp: qwix's PTQ quantizes float weights itself by its own rules, at trace time, into its own
QArray params, on dot_generals whose operand is a param. It cannot take ChatGLM's stored int8 / packed int4
values and float16 scales as they are, and our Dense reshapes the kernel before its dot_general. What we take
from qwix is its weight-only int8 matmul: the int8 weight converted to the compute dtype inside the jitted
product (on TPU a bf16 or int8 MXU operand fused into the dot, never a float32 copy of the weights in HBM) and
the per-channel scale applied to the product's output.
"""

from glm_jax.quant.formats import (  # noqa: F401
    BITS,
    NAMES,
    SCALE,
    check_bits,
    dequantize,
    pack_int4,
    qmax,
    quantize_kernel,
    quantize_rows,
    scale_path,
    unpack_int4,
)
