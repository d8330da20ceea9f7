"""The same tiny run on 1 device, on a (data, fsdp, tensor) = (2, 2, 2) mesh of 8 CPU devices, and on that mesh
spread over two processes on 127.0.0.1 (jax.distributed, gloo CPU collectives, 4 CPU devices each: each process
reads its own data shard and the global batch is assembled with jax.make_array_from_process_local_data). The
mesh run is trained once, in this module, for both comparisons."""

import subprocess

import numpy as np
import pytest
from helpers.cli import subprocess_env
from helpers.train_runs import CACHE, MESH_222, checkpoint_steps, cli, free_port, losses, tiny, train


@pytest.fixture(scope="module")
def mesh_222_run(tmp_path_factory):
    """The tiny run (4 steps) on a (2, 2, 2) mesh of 8 devices in this process."""
    out = tmp_path_factory.mktemp("mesh_222")
    train(tiny(out, "steps=4", *MESH_222))
    return out


def test_one_device_equals_2x2x2_mesh(tmp_path, mesh_222_run):
    train(tiny(tmp_path / "one", "steps=4"))
    l1, l8 = losses(tmp_path / "one"), losses(mesh_222_run)
    assert sorted(l1) == sorted(l8) == [1, 2, 3, 4]
    a, b = np.array([l1[s] for s in sorted(l1)]), np.array([l8[s] for s in sorted(l8)])
    np.testing.assert_allclose(b, a, rtol=1e-4)
    assert a[-1] < a[0]  # and it learns


def test_two_processes_equal_one(tmp_path, mesh_222_run):
    one, two = mesh_222_run, tmp_path / "two"
    port = free_port()
    args = [
        "--config",
        "tiny",
        f"output_dir={two}",
        "steps=4",
        "progress=lines",
        f"compilation_cache_dir={CACHE}",
        *MESH_222,
        f"distributed.coordinator=127.0.0.1:{port}",
        "distributed.num_processes=2",
    ]
    procs = [
        subprocess.Popen(
            cli(*args, f"distributed.process_id={i}"),
            env=subprocess_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=240)[0])
        finally:
            p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "2 process(es)" in outs[0]
    l1, l2 = losses(one), losses(two)
    assert sorted(l2) == [1, 2, 3, 4]
    np.testing.assert_allclose([l2[s] for s in sorted(l2)], [l1[s] for s in sorted(l1)], rtol=1e-5)
    assert checkpoint_steps(two) == [3, 4]
