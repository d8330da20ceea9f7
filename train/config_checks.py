"""The cross-key checks of glm-train's settings (train/config.py validate() calls them): the MoE training keys,
the adapters, and the data section (objective=cloze has its own keys). Each raises TrainConfigError naming the key."""

from __future__ import annotations

import dataclasses
import math


class TrainConfigError(ValueError):
    """A bad config file, key or value: glm-train exits 2 with this message."""


def check_moe(cfg: dict) -> None:
    """mtp_loss_weight and moe.*: numbers >= 0; not for cloze; not with an adapter where they change the base.
    Whether the model has MTP layers and experts: train/moe_rules.py check_model."""
    keys = {"mtp_loss_weight": cfg["mtp_loss_weight"], **{f"moe.{k}": v for k, v in cfg["moe"].items()}}
    keys["dsa.indexer_loss_weight"] = cfg["dsa"]["indexer_loss_weight"]
    for k, v in keys.items():
        if not math.isfinite(v) or v < 0:
            raise TrainConfigError(f"{k} must be a finite number >= 0 (0: off), got {v}")
    on = [k for k, v in keys.items() if v]
    if on and cfg["objective"] == "cloze":
        raise TrainConfigError(f"{on[0]} applies to language-model batches; objective=cloze has none (set it to 0)")
    if cfg["dsa"]["warmup"]:
        if not cfg["dsa"]["indexer_loss_weight"]:
            raise TrainConfigError("dsa.warmup trains the indexers by their loss alone: set dsa.indexer_loss_weight>0")
        other = [k for k in on if k != "dsa.indexer_loss_weight"] + (["freeze"] if cfg["freeze"] else [])
        if other:
            key = other[0]
            raise TrainConfigError(f"{key} with dsa.warmup: the warm-up trains the indexers only (set it to 0)")
        on = on + ["dsa.warmup"]
    base = [k for k in on if k != "moe.aux_loss_weight"]
    if base and (cfg["lora"]["rank"] or cfg["ptuning"]["pre_seq_len"]):
        raise TrainConfigError(
            f"{base[0]} changes the base model (MTP layers, score biases); an adapter run keeps it bit-identical"
        )


def check_adapters(cfg: dict) -> None:
    lo, pt = cfg["lora"], cfg["ptuning"]
    if lo["rank"] and lo["r"] and lo["rank"] != lo["r"]:
        raise TrainConfigError(f"lora.rank={lo['rank']} and lora.r={lo['r']} disagree (r is PEFT's name for rank)")
    if lo["targets"] and lo["target_modules"] and lo["targets"] != lo["target_modules"]:
        raise TrainConfigError("lora.targets and lora.target_modules disagree (target_modules is PEFT's name)")
    lo["rank"], lo["targets"] = lo["rank"] or lo["r"], lo["targets"] or lo["target_modules"]
    lo["r"], lo["target_modules"] = lo["rank"], lo["targets"]
    if lo["rank"] < 0 or pt["pre_seq_len"] < 0:
        raise TrainConfigError("lora.rank and ptuning.pre_seq_len must be >= 0 (0: off)")
    if lo["rank"] and not lo["targets"]:
        raise TrainConfigError("lora.rank > 0 needs lora.targets, e.g. [q_proj, v_proj], [query_key_value], all-linear")
    if not all(isinstance(t, str) for t in lo["targets"]):
        raise TrainConfigError(f"lora.targets must be module names, got {lo['targets']!r}")
    if not math.isfinite(lo["alpha"]) or lo["alpha"] <= 0:
        raise TrainConfigError(f"lora.alpha must be a positive number, got {lo['alpha']}")
    if lo["dropout"] != 0:  # the adapter is applied as a weight delta (glm_jax/adapters.py): no input dropout
        raise TrainConfigError(f"lora.dropout={lo['dropout']}: only 0 is supported (the adapter is a weight delta)")
    if lo["rank"] and pt["pre_seq_len"]:
        raise TrainConfigError("lora and ptuning together: train one adapter at a time")
    if cfg["quantize"] != "none" and not (lo["rank"] or pt["pre_seq_len"]):
        raise TrainConfigError(
            f"quantize={cfg['quantize']} freezes the base as int8 / int4 weights, so it trains only with an adapter "
            "(lora.rank=... or ptuning.pre_seq_len=...); full-parameter training needs quantize=none"
        )


def check_data_keys(cfg: dict) -> None:
    from glm_jax.data.config import DataConfig

    if cfg["objective"] == "cloze":  # its own keys (a verbaliser, ...): train/cloze_data.py
        return _check_cloze(cfg)
    if cfg["objective"] == "grpo":  # data.source and data.tokenizer: train/rl/grpo.py checks them
        return
    if cfg["objective"] == "dpo":  # preference records: train/rl/dpo_data.py
        return _check_dpo_data(cfg)
    data = cfg["data"]
    names = {f.name for f in dataclasses.fields(DataConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise TrainConfigError(
            f"unknown data key(s) {['data.' + k for k in unknown]}; DataConfig has {', '.join(sorted(names))}"
        )


CLOZE_KEYS = {"source", "tokenizer", "format", "verbalizer", "length_penalty", "include_eop", "cache_dir"}


def _check_cloze(cfg: dict) -> None:
    """objective=cloze's data keys (train/cloze_data.py reads them), checked before anything is built."""
    from glm_jax.data.cloze import check_verbalizer

    d = cfg["data"]
    other = sorted(k for k in d if k not in CLOZE_KEYS and d[k] is not None)
    if other:
        raise TrainConfigError(f"objective=cloze takes data.{', data.'.join(sorted(CLOZE_KEYS))}; got data.{other[0]}")
    if d.get("format") not in (None, "cloze"):
        raise TrainConfigError(f"objective=cloze: data.format must be cloze (or unset), got {d.get('format')!r}")
    source = d.get("source")
    if not isinstance(source, str) or source in ("", "bundled"):
        raise TrainConfigError("objective=cloze needs data.source=<a .jsonl file or a folder of them>")
    try:
        check_verbalizer(d.get("verbalizer"))
    except ValueError as e:
        raise TrainConfigError(f"data.{e}") from None
    lp = d.get("length_penalty", 0.0)
    if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not math.isfinite(lp) or lp < 0:
        raise TrainConfigError(f"data.length_penalty must be a number >= 0, got {lp!r}")
    if not isinstance(d.get("include_eop", True), bool):
        raise TrainConfigError(f"data.include_eop must be true or false, got {d.get('include_eop')!r}")
    if cfg["compile_only"]:
        raise TrainConfigError("compile_only=true prices language-model batches; objective=cloze is not supported")
    if cfg["z_loss"]:
        raise TrainConfigError("z_loss applies to the vocabulary softmax; objective=cloze has none (set z_loss=0)")


def check_grpo(cfg: dict) -> None:
    """objective=grpo's keys (train/rl/grpo.py): G divides batch_size, the choices, the reward list."""
    from train.rl.losses import GRPO_LOSS_TYPES

    g, B = cfg["grpo"], cfg["batch_size"]
    if g["num_generations"] < 2 or B % g["num_generations"]:
        raise TrainConfigError(
            f"grpo.num_generations must be >= 2 and divide batch_size {B} (completions a step); "
            f"got {g['num_generations']}"
        )
    if g["loss_type"] not in GRPO_LOSS_TYPES:
        raise TrainConfigError(f"grpo.loss_type must be one of {', '.join(GRPO_LOSS_TYPES)}; got {g['loss_type']!r}")
    if g["scale_rewards"] not in ("group", "batch", "none"):
        raise TrainConfigError(f"grpo.scale_rewards must be one of group, batch, none; got {g['scale_rewards']!r}")
    for k in ("max_new_tokens", "num_iterations"):
        if g[k] < 1:
            raise TrainConfigError(f"grpo.{k} must be >= 1, got {g[k]}")
    if (
        not g["temperature"] > 0
        or not 0 < g["top_p"] <= 1
        or g["beta"] < 0
        or g["epsilon"] < 0
        or g["epsilon_high"] < 0
    ):
        raise TrainConfigError("grpo: temperature must be > 0, top_p in (0, 1], beta, epsilon and epsilon_high >= 0")
    if not g["rewards"] or not all(isinstance(r, str) for r in g["rewards"]):
        raise TrainConfigError("objective=grpo needs grpo.rewards: a list of module.path:function names")
    w = g["reward_weights"]
    if w and (len(w) != len(g["rewards"]) or not all(isinstance(x, (int, float)) for x in w)):
        raise TrainConfigError(f"grpo.reward_weights: one number a reward ({len(g['rewards'])}); got {w!r}")
    if cfg["seq_len"] <= g["max_new_tokens"]:
        raise TrainConfigError(f"seq_len {cfg['seq_len']} leaves no room for prompts after grpo.max_new_tokens")


DPO_DATA_KEYS = {"source", "tokenizer"}


def _check_dpo_data(cfg: dict) -> None:
    other = sorted(k for k in cfg["data"] if k not in DPO_DATA_KEYS and cfg["data"][k] is not None)
    if other:
        raise TrainConfigError(f"objective=dpo takes data.{', data.'.join(sorted(DPO_DATA_KEYS))}; got data.{other[0]}")


def check_dpo(cfg: dict) -> None:
    """dpo.*: TRL's loss types, beta > 0 (ipo divides by it), label smoothing in [0, 0.5) for sigmoid only; what
    objective=dpo does not combine with (train/rl/dpo.py)."""
    from train.rl.losses import DPO_LOSS_TYPES

    d = cfg["dpo"]
    if d["loss"] not in DPO_LOSS_TYPES:
        raise TrainConfigError(f"dpo.loss must be one of {', '.join(DPO_LOSS_TYPES)}; got {d['loss']!r}")
    if not math.isfinite(d["beta"]) or d["beta"] <= 0:
        raise TrainConfigError(f"dpo.beta must be a number > 0, got {d['beta']}")
    if not math.isfinite(d["label_smoothing"]) or not 0 <= d["label_smoothing"] < 0.5:
        raise TrainConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {d['label_smoothing']}")
    if d["label_smoothing"] and d["loss"] != "sigmoid":
        raise TrainConfigError(f"dpo.label_smoothing applies to dpo.loss=sigmoid, not {d['loss']}")
    if cfg["objective"] != "dpo":
        return
    if cfg["ptuning"]["pre_seq_len"]:
        raise TrainConfigError("objective=dpo trains a LoRA adapter or the full model; P-Tuning is not supported")
    on = [k for k in ("mtp_loss_weight", "z_loss", "eval_every") if cfg[k]]
    on += [f"moe.{k}" for k, v in cfg["moe"].items() if v]
    if on:
        raise TrainConfigError(f"{on[0]} is not supported with objective=dpo (set it to 0)")
