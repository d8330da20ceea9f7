"""Helpers shared by the glm-train tests (no tests here): tiny configs, metrics and checkpoint readers."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import tempfile

import numpy as np

from helpers import FIX
from helpers.cli import module_argv

# one persistent XLA cache for every run of the test session: identical steps compile once
CACHE = os.environ.get("GLM_TRAIN_TEST_CACHE") or tempfile.mkdtemp(prefix="glm-train-xla-")


def tiny(out_dir, *overrides) -> dict:
    """The tiny test config (train/configs/tiny.yaml) writing to out_dir, with key=value overrides."""
    from train.config import build

    return build("tiny", [f"output_dir={out_dir}", "progress=none", f"compilation_cache_dir={CACHE}", *overrides])


def train(tc: dict) -> dict:
    from train.trainer import train as _train

    return _train(tc)


def metrics(out_dir) -> list[dict]:
    return [json.loads(x) for x in (pathlib.Path(out_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]


def losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(out_dir) if "loss" in r}


def checkpoint_steps(out_dir) -> list[int]:
    d = pathlib.Path(out_dir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "params").is_dir())


def load_params(out_dir, step) -> dict:
    """A saved params pytree as numpy arrays (restored onto one device, whatever the saved sharding)."""
    import jax
    import orbax.checkpoint as ocp

    path = pathlib.Path(out_dir).absolute() / "checkpoints" / str(step) / "params"
    ckptr = ocp.StandardCheckpointer()
    meta = ckptr.metadata(path)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), tree)
    return jax.tree.map(np.asarray, ckptr.restore(path, target))


def flat(tree) -> dict:
    from flax import traverse_util

    return traverse_util.flatten_dict(tree, sep="/")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args) -> list[str]:
    """argv of glm-train in a subprocess (its environment: helpers.cli.subprocess_env)."""
    return module_argv("train.main", *args)


MESH_222 = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, end of document 256: fits the vocabulary of every fixture model (512 ids)."""

    special_tokens = {"</s>": 256}
    vocab_size = 257

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode(errors="replace")


GLM4_MOE = FIX / "transformers-glm4-moe" / "model"


def folder_config(model, out, *keys) -> dict:
    """glm-train causal LM from a checkpoint folder (model=FOLDER) on the bundled corpus read by ByteTokenizer,
    batch 8, logging every step, writing to out."""
    from train.config import build

    base = ["objective=causal", "batch_size=8", "log_every=1", "progress=none", f"compilation_cache_dir={CACHE}"]
    tc = build(None, [f"model={model}", f"output_dir={out}", *base, *keys])
    tc.data["tokenizer"] = ByteTokenizer()
    return tc


def glm4_moe_run(out, *keys) -> dict:
    """glm-train on the Glm4Moe fixture: 2 steps of 8 x 32 tokens at a learning rate that moves every param, and a
    checkpoint at step 2."""
    steps = ["seq_len=32", "steps=2", "learning_rate=1e-2", "weight_decay=0.1", "checkpoint_every=2"]
    return folder_config(GLM4_MOE, out, *steps, *keys)
