"""glm-jax: the GLM model family in JAX/Flax."""

from glm_jax.config import ConfigError, GLMConfig  # noqa: F401


def __getattr__(name):  # heavy or optional pieces load on first use
    if name in ("param_shapes", "cache_shapes"):
        import importlib

        return getattr(importlib.import_module("glm_jax.model.transformer"), name)
    if name in ("from_pretrained", "GLM"):
        import importlib

        return getattr(importlib.import_module("glm_jax.api"), name)
    if name == "load_tokenizer":
        import importlib

        return importlib.import_module("glm_jax.tokenizers").load_tokenizer
    if name == "infilling":
        import importlib

        return importlib.import_module("glm_jax.infilling")
    raise AttributeError(name)
