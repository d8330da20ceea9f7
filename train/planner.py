"""compile_only's verdict when a step does not fit: XLA's out-of-memory refusal read as a finding, the chip's HBM as
XLA states it, and what would make the step fit.

Nothing here compiles the model again. The suggestions come from the config and one rough, per-device memory
model (`memory_parts`): arguments (exact, from the shardings), gradients (params / (fsdp·tensor) in float32),
attention scores (XLA attention only), logits, and the activations each layer keeps for the backward pass. The
model's activation terms are scaled so that they add up to the temporaries XLA reported; a change of config is
then priced by recomputing the terms it touches. Every figure that comes from this model is an *estimate*, and
the report says so.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import numpy as np

from glm_jax.model.transformer import param_count

GIB = 1024**3
_UNIT = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}  # XLA's "G" is GiB (128.00G = 2**37 B)
_NUM = r"([\d.]+)\s*([KMGT]?)i?B?"
_TEMPS = re.compile(r"HLO temporaries \(" + _NUM + r"\) exceeds available HBM \(" + _NUM + r"\)")
_USED = re.compile(r"Used " + _NUM + r" of " + _NUM + r" hbm", re.I)
_ARGS = re.compile(r"arguments " + _NUM, re.I)
MARGIN = 0.95  # a fit plan aims below this share of HBM: the figures it prices are estimates


def _bytes(num: str, unit: str) -> int:
    return int(round(float(num) * _UNIT[unit.upper()]))


def is_hbm_oom(msg: str) -> bool:
    return "RESOURCE_EXHAUSTED" in msg and ("HBM" in msg or " hbm" in msg)


def parse_oom(msg: str) -> dict | None:
    """XLA:TPU's refusal → {'temp': bytes or None, 'used': bytes or None, 'hbm': bytes, 'arguments': bytes or None}.
    Two forms are known: "the total memory required for HLO temporaries (133.02G) exceeds available HBM (95.74G)"
    (temporaries only) and "Used 120.5G of 95.74G hbm ... arguments 10.0G" (everything). None: not an HBM refusal."""
    if not is_hbm_oom(msg):
        return None
    out = {"temp": None, "used": None, "hbm": None, "arguments": None}
    m = _TEMPS.search(msg)
    if m:
        out["temp"], out["hbm"] = _bytes(*m.group(1, 2)), _bytes(*m.group(3, 4))
    m = _USED.search(msg)
    if m:
        out["used"], out["hbm"] = _bytes(*m.group(1, 2)), _bytes(*m.group(3, 4))
        a = _ARGS.search(msg)
        out["arguments"] = _bytes(*a.group(1, 2)) if a else None
    return out


def xla_hbm_bytes(devices) -> int | None:
    """The HBM per device that XLA's compiler allows on this topology, read from its refusal of a program that
    needs 128 GiB of temporaries (about 0.3 s; nothing of the model). None when it does not say."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(devices[:1]), ("x",))
    x = jax.ShapeDtypeStruct((1 << 17,), jax.numpy.float32, sharding=NamedSharding(mesh, P()))

    def big(v):  # two [2**17, 2**17] float32 temporaries (64 GiB each) that XLA cannot fuse away
        y = jax.numpy.sin(jax.numpy.broadcast_to(v[:, None], (1 << 17, 1 << 17)))
        return y[::-1] + y.T

    try:
        jax.jit(big).lower(x).compile()
    except Exception as e:  # the refusal is the answer
        got = parse_oom(str(e))
        return got["hbm"] if got else None
    return None


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the first device's shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.shape
        sh = getattr(leaf, "sharding", None)
        if sh is not None:
            shape = sh.shard_shape(shape)
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


# ---------------------------------------------------------------- the memory model (estimates)
@dataclasses.dataclass
class Setting:
    """What the memory model looks at: the config's knobs and the mesh's shape."""

    batch_size: int
    grad_accum: int
    seq_len: int
    remat: str
    dtype: str
    loss_chunk: int
    flash: bool
    data: int
    fsdp: int
    tensor: int
    context: int

    @property
    def rows(self) -> float:  # rows per device per microbatch
        return self.batch_size / self.grad_accum / (self.data * self.fsdp)


def memory_parts(cfg, s: Setting, state_bytes: float) -> dict:
    """Per-device bytes by part (see the module docstring); `state_bytes` = the step's arguments at this mesh."""
    a = 4 if s.dtype == "float32" else 2
    tp, t = s.tensor, s.seq_len / s.context
    tok = s.rows * t  # tokens per device per microbatch
    L, D, F = cfg.num_layers, cfg.hidden_size, cfg.ffn_size
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim / tp
    heads = math.ceil(cfg.num_heads / tp)
    one_layer = tok * a * (6 * D + qkv + 3 * F / tp)  # norms, residuals, q/k/v, attention out, MLP in/out
    kept = {"none": L * one_layer, "dots": L * tok * a * (2 * D + qkv + 2 * F / tp), "full": L * tok * a * D}
    activations = kept[s.remat] + (one_layer if s.remat != "none" else 0.0)  # + the layer recomputed in the backward
    score = s.rows * heads * t * s.seq_len * (4 + a)  # scores in float32 and probabilities, one layer
    scores = 0.0 if s.flash else score * (L if s.remat == "none" else 2)
    chunk = min(s.loss_chunk, tok) if s.loss_chunk > 0 else tok
    logits = 3 * 4 * chunk * cfg.vocab_size / tp  # float32 logits, softmax, their gradient
    grads = 4 * param_count(cfg) / (s.fsdp * s.tensor)
    return {
        "arguments": state_bytes,
        "gradients": grads,
        "scores": scores,
        "logits": logits,
        "activations": activations,
    }


_ACT = ("scores", "logits", "activations")


class Estimator:
    """Prices a setting with `memory_parts`, its activation terms scaled to match what XLA measured."""

    def __init__(self, cfg, base: Setting, needed: float, arguments: float):
        self.cfg, self.base, self.arguments = cfg, base, arguments
        parts = memory_parts(cfg, base, arguments)
        act = sum(parts[k] for k in _ACT)
        measured_act = needed - arguments - parts["gradients"]
        self.scale = max(measured_act, 0.0) / act if act > 0 else 1.0

    def needed(self, s: Setting) -> float:
        # arguments at another mesh: the state splits over fsdp·tensor as the model's does
        b = self.base
        args = self.arguments * (b.fsdp * b.tensor) / (s.fsdp * s.tensor)
        p = memory_parts(self.cfg, s, args)
        return p["arguments"] + p["gradients"] + self.scale * sum(p[k] for k in _ACT)


def _grad_accum_steps(s: Setting):
    """Larger grad_accum values that keep whole rows per device."""
    micro = s.batch_size // s.grad_accum
    dp = s.data * s.fsdp
    for k in (2, 4, 8, 16, 32, 64):
        if micro % k == 0 and (micro // k) % dp == 0:
            yield s.grad_accum * k


def candidates(cfg, s: Setting, objective: str):
    """(overrides, new Setting, why) for each change of this config that lowers the memory per chip."""
    out = []
    if s.remat != "full":
        out.append(({"remat": "full"}, dataclasses.replace(s, remat="full"), "recompute each layer in the backward"))
    if s.remat == "none":
        out.append(({"remat": "dots"}, dataclasses.replace(s, remat="dots"), "keep only the matmul outputs"))
    if not s.flash:
        why = "the Pallas kernel never holds [T, S] scores"
        out.append(({"attention": "flash"}, dataclasses.replace(s, flash=True), why))
    tok = s.rows * s.seq_len / s.context
    if tok > 2048 and (s.loss_chunk == 0 or s.loss_chunk > 2048):
        why = "the output projection and loss in blocks of 2048 positions"
        out.append(({"loss_chunk": 2048}, dataclasses.replace(s, loss_chunk=2048), why))
    for ga in _grad_accum_steps(s):
        why = f"{s.rows * s.grad_accum / ga:g} rows per device per microbatch (same global batch)"
        out.append(({"grad_accum": ga}, dataclasses.replace(s, grad_accum=ga), why))
    if s.dtype == "float32":
        why = "bfloat16 activations (param_dtype stays)"
        out.append(({"dtype": "bfloat16"}, dataclasses.replace(s, dtype="bfloat16"), why))
    if s.data > 1:
        why = "shard the parameters and optimizer state over the data devices too"
        over = {"mesh.data": 1, "mesh.fsdp": s.data * s.fsdp}
        out.append((over, dataclasses.replace(s, data=1, fsdp=s.data * s.fsdp), why))
    dp = s.data * s.fsdp
    if s.rows <= 1 and dp % 2 == 0 and s.seq_len % (4 * s.context) == 0:
        # one row per device already: split the sequence (mesh.context) and take the halved fsdp back in grad_accum
        c, f = s.context * 2, s.fsdp // 2 if s.fsdp % 2 == 0 else s.fsdp
        d = s.data if f != s.fsdp else s.data // 2
        new = dataclasses.replace(s, context=c, fsdp=f, data=d, grad_accum=s.grad_accum * 2)
        over = {"mesh.context": c, "mesh.fsdp": f, "mesh.data": d, "grad_accum": new.grad_accum}
        out.append((over, new, "split each sequence over 2x more devices; fewer tokens per device per microbatch"))
    return out


def plan(cfg, s: Setting, objective: str, needed: float, arguments: float, hbm: float) -> dict:
    """Single suggestions with their estimated bytes, and a combination estimated to fit (or the closest one):
    at each step the cheapest change (COST) that fits on its own, else the one that saves most; dtype last."""
    est = Estimator(cfg, s, needed, arguments)
    singles = []
    for over, new, why in candidates(cfg, s, objective):
        singles.append({"set": over, "why": why, "estimated_bytes_per_device": int(est.needed(new))})
    singles.sort(key=lambda c: c["estimated_bytes_per_device"])
    cur, cur_over, target = s, {}, MARGIN * hbm
    for allow_dtype in (False, True):
        for _ in range(8):
            now = est.needed(cur)
            if now <= target:
                break
            opts = [
                (est.needed(n), _cost(o), o, n)
                for o, n, _ in candidates(cfg, cur, objective)
                if allow_dtype or "dtype" not in o
            ]
            opts = [x for x in opts if x[0] < now]
            if not opts:
                break
            fitting = [x for x in opts if x[0] <= target]
            best = min(fitting, key=lambda x: x[1]) if fitting else min(opts, key=lambda x: x[0])
            cur_over.update(best[2])
            cur = best[3]
    fits = est.needed(cur) <= target
    combo = {"set": cur_over, "estimated_bytes_per_device": int(est.needed(cur)), "fits": fits} if cur_over else None
    return {"suggestions": singles, "fit_plan": combo}


def _cost(over: dict) -> float:
    """How much a change costs the run (lower first): the kernel and chunking are free, recompute is not, more
    accumulation steps and a context split cost throughput, bfloat16 changes the numerics."""
    if "dtype" in over:
        return 10.0
    if "mesh.context" in over:
        return 8.0
    if "grad_accum" in over:
        return 5.0 + math.log2(over["grad_accum"])
    return {"attention": 0.0, "loss_chunk": 1.0, "remat": 2.0 if over.get("remat") == "dots" else 3.0}.get(
        next(iter(over)), 4.0
    )


def overrides_text(over: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in over.items())
