"""glm-train on a Glm4Moe checkpoint (the fixture): the router's score bias (a buffer) and the MTP layer are never
changed by the optimizer, everything else trains, and a sharded mesh gives the losses of one device."""

import jax
import numpy as np
from test_train_util import CACHE, ROOT, flat, losses, train

HF = ROOT / "tests" / "fixtures" / "transformers-glm4-moe" / "model"


class ByteTokenizer:
    special_tokens = {"</s>": 256}
    vocab_size = 257

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode(errors="replace")


def _config(out, *keys):
    from train.config import build

    tc = build(
        None,
        [
            f"model={HF}",
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


def test_buffers_and_mtp_stay_put_and_sharded_losses_equal_one_device(tmp_path):
    import glm_jax

    ref = flat(jax.tree.map(np.asarray, glm_jax.from_pretrained(HF).params))
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    train(_config(one))
    train(_config(sharded, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"))
    a, b = losses(one), losses(sharded)
    assert sorted(a) == [1, 2] and all(np.isfinite(v) for v in a.values())
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-4 * abs(a[s]), (s, a[s], b[s])
    got = flat(jax.tree.map(np.asarray, glm_jax.from_pretrained(one).params))
    assert sorted(got) == sorted(ref)
    kept = [k for k in ref if k.endswith("score_bias") or k.startswith("mtp_")]
    assert len([k for k in kept if k.endswith("score_bias")]) == 3  # layers 1, 2 and the MTP block
    for k in kept:
        assert np.array_equal(got[k], ref[k]), k
    moved = [k for k in ref if k not in kept and not np.array_equal(got[k], ref[k])]
    assert len(moved) == len(ref) - len(kept)  # every other param trained (weight decay alone moves kernels)


def test_scan_layers_run_exports_to_the_checkpoint_layout(tmp_path):
    """A scan_layers run stacks the dense layer and the MoE layers separately; glm-convert to-torch unstacks them
    into the per-expert layout. With a zero learning rate the export equals the fixture's tensors bit for bit."""
    from test_convert_roundtrip import read_tensors

    from convert.cli import main

    run = tmp_path / "run"
    train(_config(run, "scan_layers=true", "remat=full", "learning_rate=0.0", "weight_decay=0.0", "steps=1"))
    out = tmp_path / "torch"
    assert main(["to-torch", str(run), str(out)]) == 0
    want, got = read_tensors(HF), read_tensors(out)
    assert got["t"] == want["t"]
