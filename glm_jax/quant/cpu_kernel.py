"""The weight-only int8 / int4 matrix product on XLA:CPU: a C++ kernel (glm_jax/quant/cpu/quant_matmul.cc)
called through JAX's FFI, for the small-M products of decoding.

Why: XLA:CPU has no int8-weight product. For `x @ q.astype(f32)` it converts the whole int8 kernel to a float32
temporary and multiplies that (measured on [1, 384] x [384, 1024]: fp32 dot 35-69 us, int8 -> f32 convert + dot
190-230 us), and it runs a batch-1 matrix-vector product on one core. A decode step streams every weight once,
so the quantized model decoded no faster than the float one. The kernel converts the weights in registers (no
float copy in memory) and can split the output columns across threads (one thread by default: DEFAULT_THREADS).

Where it runs: `quantized_matmul` (glm_jax/model/layers.py) calls `matmul` here, which returns None (the caller
keeps XLA's path) unless the inputs are float32, the product has at most MAX_M rows (decode: M = batch), the
default backend is the CPU and the kernel builds. The call goes through `jax.lax.platform_dependent`: lowered for
TPU or GPU (e.g. an AOT compile for TPU from a CPU host) the same jaxpr takes XLA's path, so the hardware's int8 /
bf16 product there is untouched. Gradients (P-Tuning on a quantized base differentiates through the layers with
respect to x) are XLA's: a custom_vjp whose backward is the vjp of the XLA path.

Build: nothing happens at import. The first call compiles the source with the system C++ compiler ($CXX, else
g++ / c++) into $GLM_JAX_CACHE (default $XDG_CACHE_HOME/glm_jax, else ~/.cache/glm_jax), in a file named by a
hash of the source, the compiler flags, the machine and the jax / jaxlib versions, written to a temporary name
and renamed into place (concurrent builds are safe). `make venv` prebuilds it (`python -m
glm_jax.quant.cpu_kernel`). With no compiler, or a failed build, one warning says so and XLA's path is used.

Switches (environment): GLM_JAX_QUANT_KERNEL=0 turns the kernel off (XLA's path everywhere);
GLM_JAX_QUANT_KERNEL_THREADS=n sets the threads a product uses (default 1, see DEFAULT_THREADS; 0: XLA's intra-op
pool size), GLM_JAX_QUANT_KERNEL_POOL=xla runs the extra threads' work on XLA's intra-op pool instead of the
kernel's own helper threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings

SOURCE = pathlib.Path(__file__).parent / "cpu" / "quant_matmul.cc"
TARGET = "glm_quant_matmul"
# Rows of x (batch x tokens) up to which the kernel replaces XLA's product (env GLM_JAX_QUANT_KERNEL_MAX_M): decode
# steps up to batch 64, and short prefills. Measured on the bench model (bench/decode_bench.py's, int8, 2 cores):
# a 32- or 64-token prefill took 2x less time with the kernel than with XLA's path (9.6-10.7 ms vs 28-29 ms at 32
# tokens; 16 ms vs 32 ms at 64), which converts every kernel to a float32 temporary before its product.
MAX_M = 64
MIN_PARALLEL_BYTES = 32 * 1024  # smaller weights are multiplied on the calling thread alone
# Threads a product uses by default (env GLM_JAX_QUANT_KERNEL_THREADS; 0: as many as XLA's intra-op pool has).
# One: on this project's 2-core host, shared with other processes (load 4-6), the kernel's helper threads made a
# decode step slower, not faster (bench model, int8, ms/step: 1 thread 1.15-1.30; 2 threads 1.07-2.6 with the
# spinning helpers and the back-off, 2.0-2.7 on XLA's intra-op pool; after torch's generate had run, whose
# OpenMP threads spin: 1 thread 1.29-1.37, 2 threads 2.5-3.4). On idle cores, threads may pay: measure first.
DEFAULT_THREADS = "1"
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")

_lock = threading.Lock()
_state: dict = {}  # "ok": bool once a build / load was tried; "error": why not


def enabled() -> bool:
    return os.environ.get("GLM_JAX_QUANT_KERNEL", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> pathlib.Path:
    if os.environ.get("GLM_JAX_CACHE"):
        return pathlib.Path(os.environ["GLM_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "glm_jax"


def _compiler() -> str | None:
    for c in (os.environ.get("CXX"), "g++", "c++"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def library_path(cxx: str) -> pathlib.Path:
    import jax
    import jaxlib

    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), cxx.encode(), platform.machine().encode()):
        h.update(part)
        h.update(b"\0")
    h.update(f"jax {jax.__version__} jaxlib {jaxlib.__version__} py {sys.version_info[:2]}".encode())
    return cache_dir() / f"quant_matmul-{h.hexdigest()[:20]}.so"


def build(verbose: bool = False) -> pathlib.Path:
    """Compile the kernel into the cache (if it is not there yet) and return its path; raises on failure."""
    import jax.ffi

    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found ($CXX, g++ or c++)")
    out = library_path(cxx)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-4000:]}")
        if verbose:
            print(" ".join(cmd), file=sys.stderr)
        os.replace(tmp, out)  # atomic: a concurrent build writes the same bytes under the same name
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def available() -> bool:
    """Build (first call only), load and register the kernel; False, with one warning, when that fails."""
    if "ok" in _state:
        return _state["ok"]
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        try:
            import jax.ffi

            lib = ctypes.CDLL(str(build()))
            jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.GlmQuantMatmul), platform="cpu")
            _state["lib"] = lib
            _state["ok"] = True
        except Exception as e:  # any failure means: use XLA's path
            _state["ok"], _state["error"] = False, f"{type(e).__name__}: {e}"
            warnings.warn(
                f"glm_jax: the CPU int8/int4 matmul kernel is unavailable ({_state['error']}); quantized products "
                "use XLA's dequantize-then-dot path (slower decoding on CPU)",
                RuntimeWarning,
                stacklevel=3,
            )
        return _state["ok"]


def applies(x, q, n_in: int) -> bool:
    """Whether `matmul` would use the kernel for these operands (shapes and dtypes only; builds nothing)."""
    import jax
    import jax.numpy as jnp

    m = math.prod(x.shape[: x.ndim - n_in])
    return (
        x.dtype == jnp.float32
        and q.dtype == jnp.int8
        and 0 < m <= int(os.environ.get("GLM_JAX_QUANT_KERNEL_MAX_M", MAX_M))
        and enabled()
        and jax.default_backend() == "cpu"
    )


def _threads() -> int:
    return int(os.environ.get("GLM_JAX_QUANT_KERNEL_THREADS", DEFAULT_THREADS) or 0)


def kernel_2d(x2, q2, scale, bits: int, *, threads: int | None = None, isa: int = 0):
    """y [M, N] float32 = (x2 [M, K] @ q2 [K or K/2, N]) * scale [N] by the FFI kernel (CPU only; no checks
    of `applies`). isa=1 forces the portable loops (tests)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    call = jax.ffi.ffi_call(
        TARGET, jax.ShapeDtypeStruct((x2.shape[0], q2.shape[1]), jnp.float32), vmap_method="sequential"
    )
    return call(
        x2,
        q2,
        scale.astype(jnp.float32),
        bits=np.int32(bits),
        threads=np.int32(_threads() if threads is None else threads),
        min_parallel_bytes=np.int64(int(os.environ.get("GLM_JAX_QUANT_KERNEL_MIN_PARALLEL_BYTES", MIN_PARALLEL_BYTES))),
        isa=np.int32(isa),
        own_threads=np.int32(os.environ.get("GLM_JAX_QUANT_KERNEL_POOL", "own") == "own"),
    )


def matmul(x, q, scale, n_in: int, bits: int, xla_path):
    """x [..., in...] · (q · scale) by the kernel, or None where it does not apply (the caller then uses
    `xla_path(x, q, scale)`, XLA's product, which is also what other platforms lower and what gradients use)."""
    if not (applies(x, q, n_in) and available()):
        return None
    return _kernel_or_xla(x, q, scale, n_in, bits, xla_path)


def _kernel_or_xla(x, q, scale, n_in, bits, xla_path):
    import jax

    lead = x.shape[: x.ndim - n_in]
    out = q.shape[n_in:]
    k = math.prod(x.shape[x.ndim - n_in :])

    def on_cpu(x, q, scale):
        y = kernel_2d(x.reshape(-1, k), q.reshape(-1, math.prod(out)), scale.reshape(-1), bits)
        return y.reshape(lead + out).astype(x.dtype)

    @jax.custom_vjp
    def f(x, q, scale):
        return jax.lax.platform_dependent(x, q, scale, cpu=on_cpu, default=xla_path)

    def fwd(x, q, scale):
        return f(x, q, scale), (x, q, scale)

    def bwd(res, g):
        import numpy as np

        x, q, scale = res
        _, vjp = jax.vjp(lambda x, s: xla_path(x, q, s), x, scale)
        dx, ds = vjp(g)
        return dx, np.zeros(q.shape, jax.dtypes.float0), ds

    f.defvjp(fwd, bwd)
    return f(x, q, scale)


if __name__ == "__main__":  # `make venv`: prebuild into the cache
    try:
        print(build(verbose=True))
    except Exception as e:
        print(f"glm_jax: the CPU quantized-matmul kernel did not build ({e}); XLA's path will be used", file=sys.stderr)
