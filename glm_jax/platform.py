"""Choosing JAX's platform quietly, for the command-line tools (called before JAX starts its backends).

With libtpu installed (jax[tpu]), JAX probes for a TPU at start-up even on a machine that has none, and libtpu
prints errors about TPU worker hostnames and host bounds. Where no accelerator device node exists and the user
has not chosen (JAX_PLATFORMS unset), the tools say "cpu" up front. Planning for a TPU topology on such a host
(`compile_only`) loads libtpu only to describe the topology: its metadata-server query is skipped.
"""

from __future__ import annotations

import os

from glm_jax.hostmem import cpu_backend_expected


def use_cpu_when_no_accelerator() -> None:
    """JAX_PLATFORMS=cpu when it is unset and no TPU, NVIDIA or AMD device node is visible; quiet native logs."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not os.environ.get("JAX_PLATFORMS") and cpu_backend_expected():
        os.environ["JAX_PLATFORMS"] = "cpu"


def describe_tpu_without_one(accelerator_type: str) -> None:
    """Let libtpu describe a topology on a host without a TPU, without querying a metadata server."""
    if not cpu_backend_expected():
        return
    for key, value in (
        ("TPU_SKIP_MDS_QUERY", "1"),
        ("TPU_ACCELERATOR_TYPE", accelerator_type),
        ("TPU_WORKER_ID", "0"),
        ("TPU_WORKER_HOSTNAMES", "localhost"),
        ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),  # several planning processes may load libtpu at once
    ):
        os.environ.setdefault(key, value)
