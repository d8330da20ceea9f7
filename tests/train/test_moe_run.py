"""glm-train on a Glm4Moe checkpoint (the fixture): the router's score bias (a buffer) and the MTP layer are never
changed by the optimizer, everything else trains, and a sharded mesh gives the losses of one device."""

import jax
import numpy as np
from helpers.train_runs import GLM4_MOE, flat, glm4_moe_run, losses, train


def test_buffers_and_mtp_stay_put_and_sharded_losses_equal_one_device(tmp_path):
    """One device without scan vs data=2 x fsdp=2 x tensor=2 with scan_layers (a dense stack and a MoE stack) and
    remat: the same losses. The scanned run then exports with glm-convert to-torch into the per-expert layout,
    which transformers loads and runs to our logits; its MTP layer is the fixture's, bit for bit."""
    import torch
    import transformers
    from helpers.reference_files import read_tensors

    import glm_jax
    from convert.cli import main

    ref = flat(jax.tree.map(np.asarray, glm_jax.from_pretrained(GLM4_MOE).params))
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    train(glm4_moe_run(one))
    train(glm4_moe_run(sharded, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "scan_layers=true", "remat=full"))
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

    out = tmp_path / "torch"
    assert main(["to-torch", str(sharded), str(out)]) == 0
    want, exported = read_tensors(GLM4_MOE), read_tensors(out)
    assert set(exported["t"]) == set(want["t"])
    mtp = [k for k in want["t"] if k.startswith("model.layers.3.")]
    assert len(mtp) == 46 and all(exported["t"][k] == want["t"][k] for k in mtp)
    ids = np.random.default_rng(0).integers(3, 256, size=(2, 16))
    model = transformers.Glm4MoeForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(glm_jax.from_pretrained(sharded)(ids))
    assert np.abs(ours - theirs).max() <= 1e-4
