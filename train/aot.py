"""compile_only: compile the train step ahead of time for a TPU topology on this (CPU) host, with libtpu.

`jax.experimental.topologies.get_topology_desc` describes the pod's devices without having them; the same
state/batch shardings and the same jitted step as a real run are lowered with abstract arrays and compiled.
Reported: `memory_analysis()` per device (peak = arguments + outputs - donated aliases + temporaries), and
flops for the whole step on all devices (`cost_analysis()` of the SPMD program is one device's share, times
the device count; replicated work is therefore counted on every device that does it).

Flops: `cost_analysis()` counts the body of a loop once, so a step with scan over layers (or a gradient
accumulation loop) reports far fewer flops than it runs. With flops_extrapolate=true the step is also compiled
with 1 and 2 *unrolled* layers and no accumulation loop on the same global batch; per-layer flops =
F(2) - F(1), and the step's flops = F(1) + (L - 1)·(F(2) - F(1)), exact for identical layers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
import time

import jax

from glm_jax.platform import describe_tpu_without_one
from train.config import TrainConfigError

GIB = 1024**3
HBM_BYTES = {"v4": 32 * GIB, "v5e": 16 * GIB, "v5litepod": 16 * GIB, "v5p": 95 * GIB, "v6e": 32 * GIB}
# "-N" names count TensorCores; v4/v5p chips have two (one megacore device), v5e/v6e one.
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_SHAPES_3D = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
    1024: "8x8x16",
    2048: "8x16x16",
    4096: "16x16x16",
}


def topology_name(topo: str) -> tuple[str, str]:
    """'v5p:4x4x4' or 'v5p-128' → ('v5p', 'v5p:4x4x4')."""
    m = re.fullmatch(r"(v\d+[a-z]*)(?::(\d+(?:x\d+){1,2})|-(\d+))", topo.strip())
    if not m:
        raise TrainConfigError(
            f"topology {topo!r}: expected GEN:AxB[xC] (e.g. v5e:2x2, v5p:4x4x4) or GEN-N (e.g. v5e-256, v5p-128)"
        )
    gen, shape, cores = m.group(1), m.group(2), m.group(3)
    if shape is None:
        n = int(cores)
        chips = n // 2 if gen in ("v4", "v5p") else n
        table = _SHAPES_3D if gen in ("v4", "v5p") else _SHAPES_2D
        if chips not in table:
            raise TrainConfigError(f"topology {topo!r}: no known chip layout for {chips} chips; give GEN:AxB[xC]")
        shape = table[chips]
    return gen, f"{gen}:{shape}"


def accelerator_type(topo: str) -> str:
    """libtpu's accelerator-type name of a topology: v5p-128 (TensorCores), v5litepod-4, v6e-256 (chips)."""
    gen, name = topology_name(topo)
    chips = math.prod(int(x) for x in name.split(":")[1].split("x"))
    if gen in ("v4", "v5p"):
        return f"{gen}-{2 * chips}"
    return f"{'v5litepod' if gen == 'v5e' else gen}-{chips}"


def topology_devices(topo: str):
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise TrainConfigError(f"compile_only needs libtpu on this host (pip install 'jax[tpu]'): {e}") from None
    describe_tpu_without_one(accelerator_type(topo))
    from jax.experimental import topologies

    gen, name = topology_name(topo)
    try:
        desc = topologies.get_topology_desc(name, "tpu")
    except Exception as e:
        raise TrainConfigError(
            f"topology {name}: libtpu cannot describe it: {' '.join(str(e).split())[:300]}"
        ) from None
    return gen, name, list(desc.devices)


def batch_shapes(tc, cfg) -> dict:
    B, T = tc.batch_size, tc.seq_len
    i32 = jax.numpy.int32
    two_d = tc.objective == "chatglm_prefix" or (
        tc.objective == "blank_infilling" and tc.data.get("block_position", True)
    )
    S = jax.ShapeDtypeStruct
    return {
        "tokens": S((B, T), i32),
        "targets": S((B, T), i32),
        "loss_mask": S((B, T), jax.numpy.float32),
        "position_ids": S((B, 2, T) if two_d else (B, T), i32),
        "prefix_len": S((B,), i32),
    }


def compile_step(tc, cfg, devices):
    """(compiled, seconds, mesh) for the train step of this config on these (abstract) devices."""
    from glm_jax.sharding import axis_rules
    from train import parallel
    from train.trainer import state_layout

    mesh = parallel.build_mesh(tc.mesh, devices)
    parallel.check_batch_divisible(tc.batch_size, tc.grad_accum, mesh)
    lay = state_layout(tc, cfg, mesh)  # outside the rules context: param boxes unbox without constraints
    shapes = batch_shapes(tc, cfg)
    b_sh = parallel.batch_shardings(mesh, shapes)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=b_sh[k]) for k, v in shapes.items()}
    rep = parallel.replicated(mesh)
    with jax.set_mesh(mesh), axis_rules():
        fn = jax.jit(
            lay["train_step"],
            in_shardings=(lay["state_sh"], b_sh),
            out_shardings=(lay["state_sh"], rep),
            donate_argnums=(0,),
        )
        t = time.perf_counter()
        compiled = fn.lower(lay["abstract"], batch).compile()
    return compiled, time.perf_counter() - t, mesh


def _flops(compiled) -> float:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0]
    return float(ca.get("flops", 0.0)) if ca else 0.0


def compile_report(tc) -> dict:
    from train import flops as flops_lib
    from train.trainer import model_config, use_compilation_cache

    use_compilation_cache(tc.compilation_cache_dir)
    gen, name, devices = topology_devices(tc.topology)
    cfg, _ = model_config(tc)
    compiled, secs, mesh = compile_step(tc, cfg, devices)
    ma = compiled.memory_analysis()
    mem = {
        k: int(getattr(ma, k + "_size_in_bytes", 0)) for k in ("argument", "output", "alias", "temp", "generated_code")
    }
    peak = int(getattr(ma, "peak_memory_in_bytes", 0)) or mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
    n_dev = mesh.devices.size
    raw = _flops(compiled) * n_dev  # cost_analysis of an SPMD program counts one device's share
    loops = cfg.scan_layers or tc.grad_accum > 1
    xla, method = raw, "single unrolled compile (no loops)"
    per_layer = None
    if loops and tc.flops_extrapolate:
        one = dataclasses.replace(tc, grad_accum=1)
        f1 = _flops(compile_step(one, cfg.replace(num_layers=1, scan_layers=False), devices)[0]) * n_dev
        f2 = _flops(compile_step(one, cfg.replace(num_layers=2, scan_layers=False), devices)[0]) * n_dev
        per_layer = f2 - f1
        xla = f1 + (cfg.num_layers - 1) * per_layer
        method = "extrapolated from unrolled 1- and 2-layer compiles without an accumulation loop: F1 + (L-1)(F2-F1)"
    elif loops:
        method = "as compiled: loop bodies (scan over layers / accumulation) counted once, so an undercount"
    tokens = tc.batch_size * tc.seq_len
    model_flops = flops_lib.flops_per_token(cfg, tc.seq_len) * tokens
    hbm = tc.hbm_bytes or HBM_BYTES.get(gen)
    fits = None if not hbm else peak <= hbm
    verdict = (
        f"{name} mesh {dict(mesh.shape)}: {peak / GIB:.2f} GiB per chip"
        + (
            f" of {hbm / GIB:.0f} GiB HBM: {'fits' if fits else 'does NOT fit'}"
            if hbm
            else " (HBM size unknown for this generation; pass hbm_bytes=...)"
        )
        + f"; XLA/model flops {xla / model_flops:.2f} (compile {secs:.1f}s)"
    )
    report = {
        "topology": name,
        "devices": n_dev,
        "device_kind": devices[0].device_kind,
        "mesh": dict(mesh.shape),
        "model": tc.model,
        "num_params": cfg.num_params(),
        "batch_size": tc.batch_size,
        "seq_len": tc.seq_len,
        "grad_accum": tc.grad_accum,
        "remat": cfg.remat,
        "scan_layers": cfg.scan_layers,
        "dtype": cfg.dtype,
        "param_dtype": cfg.param_dtype,
        "peak_memory_bytes_per_device": peak,
        "memory_bytes": mem,
        "hbm_bytes_per_device": hbm,
        "fits": fits,
        "flops": xla,
        "xla_flops_per_step": xla,
        "xla_flops_as_compiled": raw,
        "xla_flops_per_layer": per_layer,
        "flops_method": method,
        "model_flops_per_step": model_flops,
        "xla_over_model_flops": xla / model_flops,
        "flops_per_device": xla / n_dev,
        "compile_seconds": secs,
        "verdict": verdict,
    }
    if jax.process_index() == 0:
        out = pathlib.Path(tc.output_dir)
        if out.exists() and not out.is_dir():
            raise TrainConfigError(f"output_dir {out} exists and is not a folder")
        out.mkdir(parents=True, exist_ok=True)
        (out / "compile_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
