"""What asking "stop now?" costs each step in a multi-process run (train/loop.py Stop), in one run of two
processes (jax.distributed on 127.0.0.1, gloo CPU collectives, 4 CPU devices each):
  all-gather   multihost_utils.process_allgather of each process's SIGTERM flag (the fallback: a collective);
  sync point   multihost_utils.reached_preemption_sync_point(step) (the default: a flag read, no collective).
Printed per call and as the ratio all-gather / sync point, from process 0.

    .venv/bin/python bench/stop_bench.py [--calls 200]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time


def worker(pid: int, port: int, calls: int) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import numpy as np
    from jax.experimental import multihost_utils as mu

    flag = np.array([0], np.int32)
    mu.process_allgather(flag)  # the first call sets gloo up
    t = time.perf_counter()
    for _ in range(calls):
        mu.process_allgather(flag)
    gather = (time.perf_counter() - t) / calls
    t = time.perf_counter()
    for step in range(1, 100 * calls + 1):
        mu.reached_preemption_sync_point(step)
    sync = (time.perf_counter() - t) / (100 * calls)
    if pid == 0:
        print(
            f"per step: all-gather {gather * 1e3:.3f} ms, sync point {sync * 1e6:.3f} us; "
            f"all-gather / sync point {gather / sync:.0f}x",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--worker", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker >= 0:
        return worker(a.worker, a.port, a.calls)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [sys.executable, __file__, f"--calls={a.calls}", f"--port={port}"]
    procs = [subprocess.Popen([*cmd, f"--worker={i}"], env=env) for i in range(2)]
    sys.exit(max(p.wait() for p in procs))


if __name__ == "__main__":
    main()
