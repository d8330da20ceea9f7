"""Hand-written kernels the model dispatches to where XLA has no good one (glm_jax/kernels/quant_cpu.py)."""
