"""glm-train's rules for GLM-5's DeepSeek sparse attention (DSA), DeepSeek-V3.2's indexer training (arXiv 2512.02556
§2.1; the model side is glm_jax/model/indexer.py):

- `dsa.indexer_loss_weight` w > 0: the objective gains w × the indexer loss, the mean over the layers that run
  their own indexer (MTP layers included when the MTP loss runs them) of each layer's KL divergence from its
  indexer's distribution to the model's attention (attention probabilities summed over heads, L1-normalised,
  detached), averaged over queries. The indexer's inputs are detached too, so this loss trains the indexer alone
  and the language-model loss everything else (no gradient reaches the indexer through its discrete choice).
- `dsa.warmup=true` (the dense warm-up stage): attention is dense (every visible key, cfg.index_dense), the KL runs
  over every visible key, and only the indexers' weights train: every other param is frozen (byte-identical).
- Metrics: `dsa/indexer_loss` (the unweighted indexer loss).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import traverse_util

from train.config import TrainConfigError

INDEXER = "indexer"  # the indexer module's name in every attention layer's param path


def check_model(tc, cfg) -> None:
    """dsa.* need a model with the DSA indexer."""
    d = tc.dsa
    if (d.indexer_loss_weight or d.warmup) and not cfg.index_topk:
        key = "dsa.warmup" if d.warmup else "dsa.indexer_loss_weight"
        raise TrainConfigError(f"{key}: model={tc.model} has no sparse-attention indexer (index_topk = 0)")


def model_overrides(tc) -> dict:
    """GLMConfig fields the run sets: dense attention during the warm-up."""
    return {"index_dense": True} if tc.dsa.warmup else {}


def frozen(params) -> dict:
    """dsa.warmup: True for every param outside an indexer (the tree of `params`)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: INDEXER not in k for k in flat})


def read_loss(*trees):
    """The mean over indexer layers of the KL each sowed (glm_jax/model/mla.py: `indexer_loss`, one scalar per
    layer, [layers] for a scanned stack), from the `intermediates` of the model's applies."""
    total, n = jnp.zeros((), jnp.float32), 0
    for tree in trees:
        for path, v in traverse_util.flatten_dict(dict(tree)).items():
            if path[-1] == "indexer_loss":
                (x,) = v  # sow appends to a tuple; one call per module per apply
                total, n = total + jnp.sum(x), n + (x.size if isinstance(x, jax.Array) else 1)
    if not n:
        raise ValueError("dsa.indexer_loss_weight: the model sowed no indexer loss")
    return total / n
