"""Helpers shared by the glm-train tests (no tests here): tiny configs, metrics and checkpoint readers."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import sys
import tempfile

import numpy as np
import pytest

from helpers import FIX, ROOT

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


def cli_env(devices: int = 8) -> dict:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=str(ROOT),
    )
    return env


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "train.main", *args]


MESH_222 = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")


@pytest.fixture(scope="session")
def mesh_222_run(tmp_path_factory):
    """The tiny run (4 steps) on a (2, 2, 2) mesh of 8 devices, shared by the mesh and multi-process tests."""
    out = tmp_path_factory.mktemp("mesh_222")
    train(tiny(out, "steps=4", *MESH_222))
    return out


class ByteTokenizer:
    special_tokens = {"</s>": 256}
    vocab_size = 257

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode(errors="replace")


GLM4_MOE = FIX / "transformers-glm4-moe" / "model"


def glm4_moe_run(out, *keys):
    """glm-train causal LM on the Glm4Moe fixture with ByteTokenizer: 2 steps of batch 8 x 32, a checkpoint at 2."""
    from train.config import build

    tc = build(
        None,
        [
            f"model={GLM4_MOE}",
            "objective=causal",
            f"output_dir={out}",
            "batch_size=8",
            "seq_len=32",
            "steps=2",
            "learning_rate=1e-2",
            "weight_decay=0.1",
            "checkpoint_every=2",
            "log_every=1",
            "progress=none",
            f"compilation_cache_dir={CACHE}",
            *keys,
        ],
    )
    tc.data["tokenizer"] = ByteTokenizer()
    return tc
