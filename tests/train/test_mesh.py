"""The same run on 1 device and on a (data, fsdp, tensor) = (2, 2, 2) mesh of 8 CPU devices."""

import numpy as np
from helpers.train_runs import losses, tiny, train


def test_one_device_equals_2x2x2_mesh(tmp_path, mesh_222_run):
    train(tiny(tmp_path / "one", "steps=4"))
    l1, l8 = losses(tmp_path / "one"), losses(mesh_222_run)
    assert sorted(l1) == sorted(l8) == [1, 2, 3, 4]
    a, b = np.array([l1[s] for s in sorted(l1)]), np.array([l8[s] for s in sorted(l8)])
    np.testing.assert_allclose(b, a, rtol=1e-4)
    assert a[-1] < a[0]  # and it learns
