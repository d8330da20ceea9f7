"""A params store read as the float model of its weight-only quantized kernels.

A glm-train LoRA run on a quantized base (glm-train `quantize=int8|int4`, or a ChatGLM `quantization_bit`
checkpoint) trains W = q · scale + (alpha / r) · B @ A: its forward adds the adapter's delta to the dequantized
kernel (glm_jax/adapters.py apply_lora). That sum is not an int8 kernel, so such a run is read back as the float
model it trained: every quantized kernel comes back as float32 q · scale (formats.dequantize) and the
`kernel_scale` leaves are hidden; the adapter is then merged on top by glm_jax.adapters.MergedStore, and the
config says quantization_bit 0. `from_pretrained(RUN, quantize="int8")` quantizes the result again where a
smaller model is wanted.
"""

from __future__ import annotations

import numpy as np

from glm_jax.checkpoint import layout
from glm_jax.checkpoint.store import ParamStore, StoreView
from glm_jax.quant.formats import SCALE, check_bits, dequantize, scale_path


def float_config(cfg):
    """The config of the dequantized model: quantization_bit 0 (also in the config.json it writes)."""
    hf = cfg.hf_config
    if hf and "quantization_bit" in hf:
        hf = {**hf, "quantization_bit": 0}
    return cfg.replace(quantization_bit=0, hf_config=hf)


class DequantizedStore(StoreView):
    """`base` with each quantized kernel read as float32 q · scale, its scale leaf hidden."""

    def __init__(self, base: ParamStore, bits: int):
        super().__init__(base)
        self.bits = check_bits(bits)
        self.quantized = {p for p in base.leaves if p.endswith("/kernel") and scale_path(p) in base.leaves}
        self.leaves = {p: v for p, v in base.leaves.items() if not p.endswith("/" + SCALE)}

    def changes(self, path) -> bool:
        return self.base.locate(path)[0] in self.quantized

    def shape(self, path):
        s = tuple(self.base.shape(path))
        if self.bits == 4 and self.changes(path):
            lead = 1 if layout.is_stacked(path) else 0
            axis = lead + len(s) - len(self.base.shape(scale_path(path))) - 1  # the last in-dim, packed
            s = s[:axis] + (2 * s[axis],) + s[axis + 1 :]
        return s

    def dtype(self, path) -> np.dtype:
        return np.dtype(np.float32) if self.changes(path) else self.base.dtype(path)

    def transform(self, path, q):
        scale = np.asarray(self.base.read(scale_path(path)), np.float32)
        return dequantize(q, scale, self.bits, lead=1 if layout.is_stacked(path) else 0)
