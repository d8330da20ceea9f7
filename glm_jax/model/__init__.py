"""Flax linen modules of the GLM families. Legend for shape suffixes: B batch, T query length, S key length,
D model width, N query heads, K kv heads, G query heads per kv head, H head dim, F ffn width, V vocab,
L layers, P prefix length, E experts, C context shards."""

from glm_jax.model.transformer import GLMModel, param_axes, param_shapes  # noqa: F401
