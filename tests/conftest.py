"""Test setup: CPU JAX with 8 fake devices, set before jax is imported anywhere."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib  # noqa: E402

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir():
    return FIXTURES


@pytest.fixture(scope="session")
def gcs():
    """fake-gcs-server on 127.0.0.1 for the whole session (tests/_gcs.py), with every client pointed at it."""
    from _gcs import Emulator

    emu = Emulator()
    old = {k: os.environ.get(k) for k in emu.env()}
    os.environ.update(emu.env())
    try:
        yield emu
    finally:
        emu.stop()
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
