"""glm-train's rules for mixture-of-experts models with multi-token prediction (GLM-4.5, after DeepSeek-V3):

- MTP loss (`mtp_loss_weight` w > 0): MTP layer j at position t takes the main model's final hidden state (layer
  j-1's output for j > 0) and the embedding of token t+j+1 and predicts token t+j+2, through the main model's
  embedding and output head (shared, as in DeepSeek-V3 and Megatron). Its cross-entropy is averaged over its own
  targets: token t+j+2 counts where the main loss counts it (loss_mask[t+j+1]) and, in packed rows, where
  positions t..t+j+1 are one document (segment_ids). The step's objective gains w / M · Σ_j mean CE_j. The MTP
  layers' stored embedding and head copies are not trained: they are set to the main ones after each update, so
  that an export holds the weights the MTP layers were trained with.
- Sequence-wise balance loss (`moe.aux_loss_weight` a > 0): a · Σ over MoE layers of DeepSeek-V3's per-sequence
  Σ_e f_e P_e, averaged over sequences (glm_jax.model.moe.sequence_balance).
- Aux-loss-free balancing (`moe.bias_update_rate` u > 0): after each applied update, every router's score bias
  moves by u · sign(mean load - load_e), the loads counted over the step's tokens (all microbatches).
- Metrics: `mtp_loss`, `moe/seq_balance` (mean per MoE layer; 1 = balanced), `moe/aux_loss`, and the expert load
  as max / mean over experts, per layer (`moe/load_max_over_mean/layer_3`, `.../mtp_0`) and averaged over layers
  (`moe/load_max_over_mean`).
- GLM-5's indexer loss (`dsa.indexer_loss_weight`, `dsa.warmup`): train/dsa.py.

Legend: B rows, T length, E experts, M MTP layers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import traverse_util

from glm_jax.checkpoint import layout
from train import dsa
from train.config import TrainConfigError

BIAS = ("router", "score_bias")  # a MoE module's score-bias param, below the module's path


@dataclasses.dataclass(frozen=True)
class Rules:
    mtp_weight: float = 0.0
    aux_weight: float = 0.0
    bias_rate: float = 0.0
    num_mtp: int = 0  # MTP layers the loss runs (0 when mtp_weight is 0)
    indexer_weight: float = 0.0  # GLM-5's DSA indexer loss (train/dsa.py)
    dense_offset: int = 0  # index of the first layer of a scanned MoE stack

    @classmethod
    def of(cls, cfg, tc):
        """The rules of a run, or None (neither a MoE model nor an indexer loss, or objective=cloze)."""
        iw = float(getattr(getattr(tc, "dsa", None), "indexer_loss_weight", 0.0))
        if not (cfg.num_experts or iw) or getattr(tc, "objective", "") == "cloze":
            return None
        moe = getattr(tc, "moe", None)
        w = float(getattr(tc, "mtp_loss_weight", 0.0))
        return cls(
            indexer_weight=iw,
            mtp_weight=w,
            aux_weight=float(getattr(moe, "aux_loss_weight", 0.0)),
            bias_rate=float(getattr(moe, "bias_update_rate", 0.0)),
            num_mtp=cfg.num_mtp_layers if w > 0 else 0,
            dense_offset=layout.stacks(cfg)[-1].start if cfg.scan_layers else 0,
        )


def _ahead(x_BT, n: int, fill):
    """x[:, t + n] at t, `fill` past the end."""
    B, T = x_BT.shape
    return jnp.concatenate([x_BT[:, n:], jnp.full((B, min(n, T)), fill, x_BT.dtype)], axis=1)[:, :T]


def mtp_targets(batch, j: int):
    """(targets [B, T], weights [B, T]) of MTP layer j: at t, token t+j+2 = targets[t+j+1], where the main loss
    counts that token and t..t+j+1 lie in one segment; 0 past the end."""
    s = j + 1
    m = _ahead(batch["loss_mask"].astype(jnp.float32), s, 0.0)
    seg = batch.get("segment_ids")
    if seg is not None:
        for i in range(s):  # positions t+i and t+i+1 in one segment
            m = jnp.where(_ahead(seg, i, 0) == _ahead(seg, i + 1, 0), m, 0.0)
    return _ahead(batch["targets"].astype(jnp.int32), s, 0), m


def scales(rules, batch, accum: int) -> dict:
    """Normalisers from the whole step's batch: the step divides the summed objective by the main loss count, so
    a term averaged over another count is weighted by count / that count."""
    count = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    out = {"aux": count / accum}
    if rules.num_mtp:
        n = jnp.stack([jnp.maximum(jnp.sum(mtp_targets(batch, j)[1]), 1.0) for j in range(rules.num_mtp)])
        out["mtp"] = count / n
    return out


def read_intermediates(*trees) -> tuple[dict, jax.Array]:
    """({MoE module path: load [E] or [layers, E] int32}, Σ over MoE layers of the balance term) from the
    `intermediates` the model sowed (glm_jax.model.moe.MoE)."""
    loads, bal = {}, jnp.zeros((), jnp.float32)
    for tree in trees:
        for path, v in traverse_util.flatten_dict(dict(tree)).items():
            (x,) = v  # sow appends to a tuple; one call per module per apply
            if path[-1] == "expert_load":
                loads["/".join(path[:-1])] = x
            elif path[-1] == "sequence_balance":
                bal = bal + jnp.sum(x)
    return loads, bal


def num_moe_layers(loads: dict) -> int:
    return sum(1 if x.ndim == 1 else x.shape[0] for x in loads.values())


def objective_terms(rules, sc, mtp_ce, bal):
    """The MoE rules' part of the step's summed objective (the step divides it by the main loss count)."""
    out = jnp.zeros((), jnp.float32)
    if rules.num_mtp:
        out = out + rules.mtp_weight / rules.num_mtp * jnp.sum(mtp_ce * sc["mtp"])
    if rules.aux_weight:
        out = out + rules.aux_weight * bal * sc["aux"]
    return out


def check_model(tc, cfg) -> None:
    """The keys that need a mixture-of-experts model, or one with MTP layers, against the model."""
    if tc.mtp_loss_weight and not cfg.num_mtp_layers:
        raise TrainConfigError(
            f"mtp_loss_weight={tc.mtp_loss_weight}: model={tc.model} has no multi-token-prediction layer "
            "(num_nextn_predict_layers = 0, or a checkpoint without model.layers.{num_hidden_layers}.* keys, "
            "as transformers' save_pretrained writes it)"
        )
    dsa.check_model(tc, cfg)
    on = [f"moe.{k}" for k, v in dataclasses.asdict(tc.moe).items() if v]
    if on and not cfg.num_experts:
        raise TrainConfigError(f"{on[0]}: model={tc.model} is not a mixture-of-experts model (no routed experts)")


# ---------------------------------------------------------------- after the optimizer update
def update_bias(params, loads: dict, rate: float):
    """Aux-loss-free balancing: each router's score bias += rate · sign(mean load - load_e)."""
    flat = traverse_util.flatten_dict(params)
    for key, load in loads.items():
        path = tuple(key.split("/")) + BIAS
        b = flat[path]
        x = load.astype(jnp.float32)
        flat[path] = (b + rate * jnp.sign(jnp.mean(x, axis=-1, keepdims=True) - x)).astype(b.dtype)
    return traverse_util.unflatten_dict(flat)


def sync_mtp_copies(params, cfg, num_mtp: int):
    """The MTP layers' stored embedding and output head := the main model's (which the MTP loss trained)."""
    params = dict(params)
    emb = params["embed"]["embedding"]
    head = emb.T if cfg.tie_word_embeddings else params["lm_head"]["kernel"]
    for j in range(num_mtp):
        name = f"mtp_{j}"
        layer = dict(params[name])
        layer["embed"] = {"embedding": emb.astype(layer["embed"]["embedding"].dtype)}
        layer["head"] = {"kernel": head.astype(layer["head"]["kernel"].dtype)}
        params[name] = layer
    return params


def after_update(params, cfg, rules, sums):
    if rules.bias_rate:
        params = update_bias(params, sums["loads"], rules.bias_rate)
    if rules.num_mtp:
        params = sync_mtp_copies(params, cfg, rules.num_mtp)
    return params


# ---------------------------------------------------------------- metrics
def _label(key: str, rules, i: int | None) -> str:
    top = key.split("/")[0]
    if top.startswith("mtp_"):
        return top
    if i is None:  # layers_{n}: one layer
        return "layer_" + top.split("_")[1]
    return f"layer_{rules.dense_offset + i}"  # a scanned stack


def metrics(rules, sums, accum: int) -> dict:
    loads = sums["loads"]
    out = {}
    ratios = []
    for key, load in loads.items():
        x = load.astype(jnp.float32)
        r = jnp.max(x, axis=-1) / jnp.maximum(jnp.mean(x, axis=-1), 1e-9)
        if x.ndim == 1:
            out[f"moe/load_max_over_mean/{_label(key, rules, None)}"] = r
            ratios.append(r[None])
        else:
            for i in range(x.shape[0]):
                out[f"moe/load_max_over_mean/{_label(key, rules, i)}"] = r[i]
            ratios.append(r)
    if ratios:
        out["moe/load_max_over_mean"] = jnp.mean(jnp.concatenate(ratios))
        bal = sums["balance"] / accum
        out["moe/seq_balance"] = bal / num_moe_layers(loads)
        if rules.aux_weight:
            out["moe/aux_loss"] = rules.aux_weight * bal
    if rules.num_mtp:
        out["mtp_loss"] = jnp.mean(sums["mtp_ce"] / jnp.maximum(sums["mtp_count"], 1.0))
    if rules.indexer_weight:
        out["dsa/indexer_loss"] = sums["indexer_loss"] / accum
    return out
