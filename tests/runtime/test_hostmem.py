"""glm_jax.hostmem: freed host memory is reused instead of page-faulted in again (each case in a fresh process:
the malloc settings are process-wide and must precede the JAX backend)."""

import os
import subprocess
import sys

import pytest

from glm_jax import hostmem

# mallocs, touches and frees a 256 MB block twice (as XLA:CPU does with a step's temp buffer; numpy is no model:
# it asks for transparent huge pages) and prints the minor page faults of the second round.
ROUNDS = """
import ctypes, resource, sys
from glm_jax import hostmem
print("applied", hostmem.keep_freed_heap() if sys.argv[1] == "keep" else False)
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    before = faults()
    block = libc.malloc(256 << 20)
    ctypes.memset(block, 1, 256 << 20)
    libc.free(block)
print("faults", faults() - before)
"""


def _run(code, *args, env=None):
    r = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return dict(line.split(" ", 1) for line in r.stdout.strip().splitlines())


def test_kept_heap_serves_a_freed_block_again_without_page_faults():
    if hostmem._glibc() is None:  # glibc malloc only: elsewhere it changes nothing and says so
        assert _run(ROUNDS, "keep")["applied"] == "False"
        return
    kept, system = _run(ROUNDS, "keep"), _run(ROUNDS, "system")
    assert kept["applied"] == "True" and system["applied"] == "False"
    pages = (256 << 20) // 4096
    assert int(system["faults"]) > pages // 2  # glibc's default: a fresh mmap, faulted in page by page
    assert int(kept["faults"]) < pages // 20  # kept: the freed block comes back from the heap


def test_refuses_once_the_backend_has_started():
    out = _run(
        "import jax; jax.devices(); from glm_jax import hostmem; print('applied', hostmem.keep_freed_heap())",
        env={"JAX_PLATFORMS": "cpu"},
    )
    assert out["applied"] == "False"


@pytest.mark.parametrize("platforms, expected", [("cpu", "True"), ("tpu", "False"), ("cuda,cpu", "False")])
def test_auto_follows_jax_platforms(platforms, expected):
    out = _run(
        "from glm_jax import hostmem; print('cpu', hostmem.cpu_backend_expected()); "
        "print('applied', hostmem.apply('auto'))",
        env={"JAX_PLATFORMS": platforms},
    )
    assert out["cpu"] == expected
    assert out["applied"] == ("True" if expected == "True" and hostmem._glibc() is not None else "False")


def test_modes():
    with pytest.raises(ValueError, match="host_heap"):
        hostmem.apply("always")
    assert hostmem.apply("system") is False
