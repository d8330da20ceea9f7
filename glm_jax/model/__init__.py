"""Flax linen modules of the GLM families. Legend for shape suffixes: B batch, T query length, S key length,
D model width, N query heads, K kv heads, G query heads per kv head, H head dim, F ffn width, V vocab,
L layers, P prefix length."""

from glm_jax.model.transformer import GLMModel, param_axes, param_shapes, stack_layers, unstack_layers  # noqa: F401
