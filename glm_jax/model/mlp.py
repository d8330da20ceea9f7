"""Feed-forward blocks: SwiGLU (ChatGLM2+, Glm, Glm4) or GELU (GLM: erf or tanh; ChatGLM-6B: tanh)."""
from __future__ import annotations

import jax
from flax import linen as nn

from glm_jax.model.layers import Dense, constrain


class MLP(nn.Module):
    cfg: object

    @nn.compact
    def __call__(self, x_BTD):
        c = self.cfg
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        up = Dense((c.hidden_size,), (c.ffn_size,), ("embed", "mlp"), c.mlp_bias, name="up", **kw)(x_BTD)
        if c.mlp == "swiglu":
            gate = Dense((c.hidden_size,), (c.ffn_size,), ("embed", "mlp"), c.mlp_bias, name="gate", **kw)(x_BTD)
            h = jax.nn.silu(gate) * up
        else:
            h = jax.nn.gelu(up, approximate=c.mlp == "gelu_tanh")
        h = constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
        return Dense((c.ffn_size,), (c.hidden_size,), ("mlp", "embed"), c.mlp_bias, name="down", **kw)(h)
