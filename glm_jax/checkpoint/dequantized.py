"""A params store read as the float model of its weight-only quantized kernels.

A glm-train LoRA run on a quantized base (glm-train `quantize=int8|int4`, or a ChatGLM `quantization_bit`
checkpoint) trains W = q · scale + (alpha / r) · B @ A: its forward adds the adapter's delta to the dequantized
kernel (glm_jax/adapters.py apply_lora). That sum is not an int8 kernel, so such a run is read back as the float
model it trained: every quantized kernel (int8, or int4 packed two per byte along its last in-dim, glm_jax/quant.py)
comes back as float32 q · scale and the `kernel_scale` leaves are hidden; the adapter is then merged on top by
glm_jax.adapters.MergedStore, and the config says quantization_bit 0. `from_pretrained(RUN, quantize="int8")`
quantizes the result again where a smaller model is wanted.
"""

from __future__ import annotations

import numpy as np

from glm_jax import quant
from glm_jax.adapters import Done
from glm_jax.families.quantized import SCALE, scale_path


def float_config(cfg):
    """The config of the dequantized model: quantization_bit 0 (also in the config.json it writes)."""
    hf = cfg.hf_config
    if hf and "quantization_bit" in hf:
        hf = {**hf, "quantization_bit": 0}
    return cfg.replace(quantization_bit=0, hf_config=hf)


class DequantizedStore:
    """`store` (a ParamStore) with each quantized kernel read as float32 q · scale, its scale leaf hidden."""

    def __init__(self, store, bits: int):
        self.base, self.bits = store, quant.check_bits(bits)
        self.quantized = {p for p in store.leaves if p.endswith("/kernel") and scale_path(p) in store.leaves}
        self.leaves = {p: v for p, v in store.leaves.items() if not p.endswith("/" + SCALE)}

    def __getattr__(self, name):
        return getattr(self.base, name)

    def paths(self):
        return list(self.leaves)

    def _is_quantized(self, path) -> bool:
        return self.base._locate(path)[0] in self.quantized

    def shape(self, path):
        s = tuple(self.base.shape(path))
        if self.bits == 4 and self._is_quantized(path):
            lead = 1 if self._stacked(path) else 0
            axis = lead + len(s) - len(self.base.shape(scale_path(path))) - 1  # the last in-dim, packed
            s = s[:axis] + (2 * s[axis],) + s[axis + 1 :]
        return s

    def dtype(self, path) -> np.dtype:
        return np.dtype(np.float32) if self._is_quantized(path) else self.base.dtype(path)

    def read(self, path) -> np.ndarray:
        q = np.asarray(self.base.read(path))
        if not self._is_quantized(path):
            return q
        scale = np.asarray(self.base.read(scale_path(path)), np.float32)
        n_in = q.ndim - scale.ndim  # in-dims (a stacked leaf's layer axis leads both)
        lead = 1 if self._stacked(path) else 0
        if self.bits == 4:
            q = quant.unpack_int4(q, lead + n_in - 1)
        return q.astype(np.float32) * np.expand_dims(scale, tuple(range(lead, lead + n_in)))

    def _stacked(self, path) -> bool:
        """A whole scan_layers stack ([L, ...]; `layers_{i}/...` reads one layer of it)."""
        return path.startswith(("layers/", "dense_layers/"))

    def read_async(self, path):
        return Done(self.read(path)) if self._is_quantized(path) else self.base.read_async(path)

    def read_rows(self, path, start, stop) -> np.ndarray:
        if self._is_quantized(path):
            return self.read(path)[start:stop]
        return self.base.read_rows(path, start, stop)
