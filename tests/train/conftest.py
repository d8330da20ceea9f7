"""Runs shared by the glm-train tests of this folder."""

import pytest
from helpers.train_runs import MESH_222, tiny, train


@pytest.fixture(scope="session")
def mesh_222_run(tmp_path_factory):
    """The tiny run (4 steps) on a (2, 2, 2) mesh of 8 devices, shared by the mesh and multi-process tests."""
    out = tmp_path_factory.mktemp("mesh_222")
    train(tiny(out, "steps=4", *MESH_222))
    return out
