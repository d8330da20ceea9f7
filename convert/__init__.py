"""glm-convert: checkpoint conversion between PyTorch / Hugging Face formats and glm-jax."""
