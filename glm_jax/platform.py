"""Choosing JAX's platform quietly, for the command-line tools and the Python API (before JAX starts its backends).

With libtpu installed (jax[tpu]), JAX probes for a TPU at start-up even on a machine that has none, and libtpu
prints errors about TPU worker hostnames and host bounds. Where no accelerator device node exists and the user
has not chosen (JAX_PLATFORMS unset), the tools say "cpu" up front. Planning for a TPU topology on such a host
(`compile_only`) loads libtpu only to describe the topology: its metadata-server query is skipped.

The library (`glm_jax.from_pretrained`, `GLM`) must not change its caller's environment, least of all at import:
it makes the same choice through JAX's own setting (`jax.config.jax_platforms`), when it first uses JAX, and
only while no backend exists and nobody has chosen a platform.
"""

from __future__ import annotations

import os

from glm_jax.hostmem import backend_started, cpu_backend_expected


def use_cpu_when_no_accelerator() -> None:
    """JAX_PLATFORMS=cpu when it is unset and no TPU, NVIDIA or AMD device node is visible; quiet native logs."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not os.environ.get("JAX_PLATFORMS") and cpu_backend_expected():
        os.environ["JAX_PLATFORMS"] = "cpu"


def cpu_at_first_use() -> None:
    """jax.config's jax_platforms = "cpu" when no backend has started, neither JAX_PLATFORMS nor jax_platforms is
    set, and no accelerator device node is visible; otherwise JAX's choice stands. os.environ is left alone."""
    import jax

    if backend_started() or os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
        return
    if cpu_backend_expected():
        jax.config.update("jax_platforms", "cpu")


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
