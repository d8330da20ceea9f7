"""Evaluation: an lm-evaluation-harness backend ("glm-jax"), GLM cloze scoring, perplexity, needle in a haystack.

glm_jax.eval.harness     GLMLM, registered with lm-eval as "glm-jax" (importing it needs lm-eval)
glm_jax.eval.cloze       multi-token cloze scores over the blank-infilling layout; cloze_loss
glm_jax.eval.perplexity  sliding-window perplexity and LAMBADA-style last-word accuracy
glm_jax.eval.needle      needle-in-a-haystack recall grid (JSON + PNG heat map)
glm_jax.eval.scoring     the batched, length-bucketed engine they share
glm-eval                 the command line (glm_jax.eval.cli)
"""
