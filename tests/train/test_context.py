"""glm-train with context parallelism: blank infilling on 8 CPU devices with the sequence split over a 'context'
mesh axis (the kernel in interpret mode, load-balanced chunks) gives the one-device run's losses and gradient norms
(XLA attention, dense masks) step for step. (Per-leaf gradients are compared in tests/model/test_context_parallel.py;
params after Adam steps are not: Adam divides near-zero gradients by their own size, which amplifies rounding.)"""

import numpy as np
import pytest
from helpers.train_runs import metrics, tiny, train


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    out = tmp_path_factory.mktemp("ctx_one")
    train(tiny(out, "steps=3", "attention=xla"))
    return out


@pytest.mark.parametrize(
    "mesh", [("mesh.data=2", "mesh.context=4"), ("mesh.fsdp=2", "mesh.context=2", "mesh.tensor=2")], ids=str
)
def test_context_parallel_run_equals_one_device(tmp_path, one_device, mesh):
    out = tmp_path / "ctx"
    train(tiny(out, "steps=3", "attention=flash", *mesh))
    m1 = [r for r in metrics(one_device) if "loss" in r]
    m8 = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in m1] == [r["step"] for r in m8] == [1, 2, 3]
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in m8], [r[key] for r in m1], rtol=1e-4, err_msg=key)
