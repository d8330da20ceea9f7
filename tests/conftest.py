"""Test setup: CPU JAX with 8 fake devices, set before jax is imported anywhere (this file is imported before any
test module of any folder), and the fixtures every folder shares. The helpers behind them live in tests/helpers/."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
from helpers import FIX, cli  # noqa: E402


@pytest.fixture(scope="session")
def fixtures_dir():
    """tests/fixtures: the golden files of the reference code."""
    return FIX


@pytest.fixture
def run_main(capsys):
    """run_main(main, *argv) -> helpers.cli.Result: a command's main() in this process, its output captured."""

    def run(main, *argv):
        return cli.run_main(capsys, main, *argv)

    return run


@pytest.fixture(scope="session")
def gcs():
    """fake-gcs-server on 127.0.0.1 for the whole session (tests/_gcs.py), with every client pointed at it."""
    from helpers.gcs import Emulator

    emu = Emulator()
    old = {k: os.environ.get(k) for k in emu.env()}
    os.environ.update(emu.env())
    try:
        yield emu
    finally:
        emu.stop()
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
