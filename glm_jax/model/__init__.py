"""Flax linen modules of the GLM families. Legend for shape suffixes: B batch, T query length, S key length,
D model width, N query heads, K kv heads, G query heads per kv head, H head dim, F ffn width, V vocab,
L layers, P prefix length, C context shards; in the MoE: M tokens (B·T flattened), E experts, X experts
chosen per token, Q expert groups, R sequences."""

from glm_jax.model.transformer import GLMModel, param_axes, param_shapes  # noqa: F401
