"""The golden model fixtures (tests/fixtures/<name>/): their folders, their io.npz, and how the reference forward
was fed, so that one parametrized test covers every family."""

import functools

import numpy as np

from helpers import FIX

MODEL_FIXTURES = [
    "glm-original",
    "chatglm-6b",
    "chatglm2-6b",
    "chatglm2-6b-ptuning-v2",
    "chatglm3-6b-32k",
    "glm-4-9b-chat-remote",
    "transformers-glm",
    "transformers-glm4",
    "transformers-glm4-moe",
]
TOL = {"chatglm-6b": 5e-4}


def io(name):
    d = dict(np.load(FIX / name / "io.npz"))
    if "greedy_ids" in d:  # the Glm4Moe fixture's name for the reference's generate output
        d["generated_ids"] = d.pop("greedy_ids")
    return d


def folders(name):
    subs = ["model", "model_sharded_safetensors"]
    return [s for s in subs if (FIX / name / s).is_dir()]


@functools.cache
def load(name, sub="model", **kw):
    import glm_jax

    return glm_jax.from_pretrained(FIX / name / sub, **kw)


def reference_inputs(name, d):
    """(kwargs for lm(...), real-token mask [B, T]) exactly as the reference forward was fed."""
    if name == "glm-original":
        return {"position_ids": d["position_ids"], "prefix_len": d["sep"]}, d["input_ids"] != 0
    if name == "chatglm-6b":  # dense mask, True = blocked in the fixture
        return ({"attention_mask": ~d["attention_mask"], "position_ids": d["position_ids"]}, d["input_ids"] != 3)
    if "position_ids" not in d:  # transformers' forward without position_ids: 0..T-1, pads included
        pos = np.broadcast_to(np.arange(d["input_ids"].shape[1]), d["input_ids"].shape)
        return {"attention_mask": d["attention_mask"], "position_ids": pos}, d["attention_mask"] == 1
    return {"attention_mask": d["attention_mask"], "position_ids": d["position_ids"]}, d["attention_mask"] == 1


def max_diff(a, b, real):
    return float(np.abs(np.asarray(a) - np.asarray(b))[real.astype(bool)].max())
