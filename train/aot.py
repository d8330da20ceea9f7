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

from glm_jax.model.transformer import param_count
from glm_jax.platform import describe_tpu_without_one
from train import planner
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
    if tc.objective == "dpo":
        from train.rl.dpo_data import batch_shapes as dpo_shapes

        return dpo_shapes(tc)
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
    parallel.check_context_divisible(tc.seq_len, mesh)
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
        lowered = fn.lower(lay["abstract"], batch)
        try:
            compiled = lowered.compile()
        except Exception as e:  # XLA's HBM refusal is a finding (DESIGN §3.9): what it says, and what is known
            if not planner.is_hbm_oom(str(e)):
                raise
            args = planner.shard_bytes((lay["abstract"], batch))
            raise DoesNotFit(str(e), mesh, args, uses_kernel(lowered), time.perf_counter() - t) from None
    return compiled, time.perf_counter() - t, mesh


class DoesNotFit(Exception):
    """XLA refused to compile the step for lack of HBM: its message, the mesh, the step's argument bytes per
    device (computed from the shardings) and whether the step calls the Pallas kernel."""

    def __init__(self, message, mesh, argument_bytes, kernel, seconds):
        super().__init__(" ".join(message.split()))
        self.mesh, self.argument_bytes, self.kernel, self.seconds = mesh, argument_bytes, kernel, seconds


def uses_kernel(stage) -> bool:
    """Whether a lowered or compiled step calls a Mosaic (Pallas TPU) kernel: a tpu_custom_call in its program."""
    return "tpu_custom_call" in stage.as_text()


def _flops(compiled) -> float:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0]
    return float(ca.get("flops", 0.0)) if ca else 0.0


def hbm_per_chip(tc, gen, devices) -> tuple:
    """(bytes, source): hbm_bytes= if set, else what XLA's compiler allows per device, else the generation's table."""
    if tc.hbm_bytes:
        return int(tc.hbm_bytes), "config hbm_bytes"
    got = planner.xla_hbm_bytes(devices)
    if got:
        return got, "XLA (the HBM its compiler allows per device)"
    return HBM_BYTES.get(gen), "table by TPU generation"


@dataclasses.dataclass
class Memory:
    """What compiling the step says about memory per device."""

    compiled: object  # the compiled step, or None when XLA refused it for lack of HBM
    mesh: object
    seconds: float
    kernel: bool  # the step calls the Pallas attention kernel
    parts: dict  # argument / output / alias / temp / generated_code bytes (None where unknown)
    peak: int | None  # bytes the step needs per device
    source: str  # where `peak` comes from
    xla_message: str | None = None  # XLA's out-of-memory message
    oom_hbm: int | None = None  # the HBM that message names


def _memory(tc, cfg, devices) -> Memory:
    try:
        compiled, secs, mesh = compile_step(tc, cfg, devices)
    except DoesNotFit as e:
        oom = planner.parse_oom(str(e))
        mem = dict.fromkeys(("argument", "output", "alias", "temp", "generated_code"))
        if oom["used"]:
            peak, mem["argument"] = oom["used"], oom["arguments"] or e.argument_bytes
            source = "XLA's out-of-memory message (all HBM it needs)"
        elif oom["temp"]:
            mem["argument"], mem["temp"] = e.argument_bytes, oom["temp"]
            peak = oom["temp"] + e.argument_bytes
            source = "XLA's out-of-memory message (temporaries) + argument bytes computed from the shardings"
        else:
            peak, source = None, "XLA refused the step for lack of HBM without saying how much it needs"
        return Memory(None, e.mesh, e.seconds, e.kernel, mem, peak, source, str(e), oom["hbm"])
    ma = compiled.memory_analysis()
    mem = {
        k: int(getattr(ma, k + "_size_in_bytes", 0)) for k in ("argument", "output", "alias", "temp", "generated_code")
    }
    mem["xla_peak"] = int(getattr(ma, "peak_memory_in_bytes", 0)) or None  # XLA's heap simulation, for reference
    # what the step holds: the sum XLA's own HBM check uses (temporaries as allocated, not as simulated live)
    peak = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
    source = "memory_analysis() of the compiled step (measured): argument + output - alias + temp"
    return Memory(compiled, mesh, secs, uses_kernel(compiled), mem, peak, source)


def extrapolated_flops(tc, cfg, devices, n_dev):
    """(step flops, per layer, method) from unrolled compiles without an accumulation loop: XLA counts a scanned
    layer once. The first d layers of a MoE model are dense, so d+1 and d+2 layers compile and their difference
    is one MoE layer. Raises DoesNotFit when the unrolled compiles do not fit."""
    one = dataclasses.replace(tc, grad_accum=1)
    d = min(cfg.first_k_dense_replace, cfg.num_layers - 1) if cfg.num_experts else 0
    f1 = _flops(compile_step(one, cfg.replace(num_layers=d + 1, scan_layers=False), devices)[0]) * n_dev
    f2 = _flops(compile_step(one, cfg.replace(num_layers=d + 2, scan_layers=False), devices)[0]) * n_dev
    n1 = d + 1
    method = (
        f"extrapolated from unrolled {n1}- and {n1 + 1}-layer compiles without an accumulation loop: "
        f"F{n1} + (L-{n1})(F{n1 + 1}-F{n1})"
    )
    return f1 + (cfg.num_layers - n1) * (f2 - f1), f2 - f1, method


@dataclasses.dataclass
class XlaFlops:
    """The step's flops as XLA's cost_analysis counts them (all devices)."""

    step: float | None  # the whole step (loops extrapolated where asked), or None when not compiled
    as_compiled: float | None  # the compiled program, loop bodies counted once
    per_layer: float | None  # one layer, when extrapolated
    method: str


def _xla_flops(tc, cfg, devices, compiled, n_dev) -> XlaFlops:
    if compiled is None:
        return XlaFlops(None, None, None, "not compiled: XLA refused the step for lack of HBM")
    raw = _flops(compiled) * n_dev  # cost_analysis of an SPMD program counts one device's share
    loops = cfg.scan_layers or tc.grad_accum > 1
    if loops and tc.flops_extrapolate:
        try:
            total, per_layer, method = extrapolated_flops(tc, cfg, devices, n_dev)
        except DoesNotFit:
            return XlaFlops(
                raw, raw, None, "as compiled (the unrolled 1-/2-layer compiles do not fit): loops counted once"
            )
        return XlaFlops(total, raw, per_layer, method)
    if loops:
        return XlaFlops(
            raw, raw, None, "as compiled: loop bodies (scan over layers / accumulation) counted once, so an undercount"
        )
    return XlaFlops(raw, raw, None, "single unrolled compile (no loops)")


def _setting(tc, cfg, mesh, kernel) -> planner.Setting:
    sh = dict(mesh.shape)
    return planner.Setting(
        batch_size=tc.batch_size,
        grad_accum=tc.grad_accum,
        seq_len=tc.seq_len,
        remat=cfg.remat,
        dtype=cfg.dtype,
        loss_chunk=tc.loss_chunk,
        flash=kernel,
        data=sh.get("data", 1),
        fsdp=sh.get("fsdp", 1),
        tensor=sh.get("tensor", 1),
        context=sh.get("context", 1),
    )


def _verdict(name, mesh, peak, hbm, fits, plan, ratio, secs) -> str:
    where = f"{name}, mesh " + " ".join(f"{k}={v}" for k, v in dict(mesh.shape).items())
    tail = (f"; flops/model {ratio:.2f}" if ratio else "") + (f", compile {secs:.1f}s" if secs is not None else "")
    need = f"{peak / GIB:.2f} GiB" if peak is not None else "an unknown amount"
    if fits is None:
        return f"verdict: unknown — needs {need} per chip; HBM of this chip unknown, pass hbm_bytes=... ({where}{tail})"
    if fits:
        return f"verdict: fits — {need} of {hbm / GIB:.2f} GiB per chip ({where}{tail})"
    line = f"verdict: does not fit — needs {need} of {hbm / GIB:.2f} GiB per chip ({where}{tail})"
    combo = plan and plan["fit_plan"]
    if combo:
        est = combo["estimated_bytes_per_device"] / GIB
        still = "" if combo["fits"] else "; still over: a larger slice too"
        line += f"; try: {planner.overrides_text(combo['set'])} (estimate {est:.1f} GiB{still})"
    else:
        line += "; no config change found: try a larger slice"
    return line


def compile_report(tc) -> dict:
    """Compile the step for tc.topology and write output_dir/compile_report.json; always a verdict (DESIGN §3.9):
    a step that XLA refuses for lack of HBM is reported with fits=false, what it needs and what would fit."""
    from train import flops as flops_lib
    from train.trainer import model_config, use_compilation_cache

    use_compilation_cache(tc.compilation_cache_dir)
    gen, name, devices = topology_devices(tc.topology)
    cfg, _ = model_config(tc)
    m = _memory(tc, cfg, devices)
    if tc.hbm_bytes or not m.oom_hbm:
        hbm, hbm_source = hbm_per_chip(tc, gen, devices)
    else:
        hbm, hbm_source = m.oom_hbm, "XLA (its out-of-memory message)"
    n_dev = m.mesh.devices.size
    fits = False if m.compiled is None else (None if not hbm else m.peak <= hbm)
    xla = _xla_flops(tc, cfg, devices, m.compiled, n_dev)
    model_flops = flops_lib.flops_per_token(cfg, tc.seq_len, mtp=tc.mtp_loss_weight > 0) * tc.batch_size * tc.seq_len
    kf = flops_lib.attention_kernel_flops(cfg, tc.batch_size, tc.seq_len, tc.objective) if m.kernel else None
    kernel_flops = kf["total"] if kf else 0.0
    total = None if xla.step is None else xla.step + kernel_flops
    plan = None
    if fits is False and hbm:
        args = m.parts["argument"] if m.parts["argument"] is not None else 0
        needed = m.peak if m.peak is not None else 0
        plan = planner.plan(cfg, _setting(tc, cfg, m.mesh, m.kernel), tc.objective, needed, args, hbm)
    ratio = None if total is None else total / model_flops
    report = {
        "topology": name,
        "devices": n_dev,
        "device_kind": devices[0].device_kind,
        "mesh": dict(m.mesh.shape),
        "model": tc.model,
        "num_params": param_count(cfg),
        "batch_size": tc.batch_size,
        "seq_len": tc.seq_len,
        "grad_accum": tc.grad_accum,
        "remat": cfg.remat,
        "scan_layers": cfg.scan_layers,
        "dtype": cfg.dtype,
        "param_dtype": cfg.param_dtype,
        "attention_kernel": m.kernel,
        # memory
        "fits": fits,
        "peak_memory_bytes_per_device": m.peak,
        "memory_bytes": m.parts,
        "memory_source": m.source,
        "hbm_bytes_per_device": hbm,
        "hbm_source": hbm_source,
        "xla_message": m.xla_message,
        "suggestions": plan["suggestions"] if plan else [],
        "fit_plan": plan["fit_plan"] if plan else None,
        "suggestions_note": "estimated bytes come from a rough per-device memory model fitted to XLA's figure "
        "(train/planner.py), not from compiling each variant"
        if plan
        else None,
        # flops: XLA's count of the step, plus the Pallas kernel's by formula (XLA cannot see inside it)
        "flops": total,
        "flops_xla_measured": xla.step,
        "flops_xla_as_compiled": xla.as_compiled,
        "flops_xla_per_layer": xla.per_layer,
        "flops_attention_kernel_computed": kernel_flops,
        "flops_attention_kernel_executed_computed": kf["executed"] if kf else 0.0,
        "flops_source": {
            "flops_xla_measured": f"measured: XLA cost_analysis() ({xla.method})",
            "flops_attention_kernel_computed": (
                "computed: " + kf["formula"] if kf else "none: the step calls no Pallas kernel (all attention in XLA)"
            ),
            "flops": "flops_xla_measured + flops_attention_kernel_computed",
        },
        "model_flops_per_step": model_flops,
        "xla_over_model_flops": None if xla.step is None else xla.step / model_flops,
        "total_over_model_flops": ratio,
        "flops_per_device": None if total is None else total / n_dev,
        "compile_seconds": m.seconds,
    }
    report["verdict"] = _verdict(name, m.mesh, m.peak, hbm, fits, plan, ratio, m.seconds)
    if jax.process_index() == 0:
        out = pathlib.Path(tc.output_dir)
        if out.exists() and not out.is_dir():
            raise TrainConfigError(f"output_dir {out} exists and is not a folder")
        out.mkdir(parents=True, exist_ok=True)
        (out / "compile_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
