"""The README's ahead-of-time table: the train step of GLM-4-9B (8K, 32K, 128K) and ChatGLM3-6B (8K, 32K) compiled
for v5p-128, v6e-256 and v5e-256 on this CPU host (libtpu's topologies, `glm-train ... compile_only=true`), with
the memory per chip XLA's compiled program needs, whether it fits the chip's HBM, and XLA/model flops.

Every row has the shipped pretraining recipe (configs/chatglm3_6b_pretrain.yaml: bf16 compute, fp32 params and
Adam, full remat, scanned layers, the Pallas attention kernel by attention=auto) on one mesh per slice, the same
for every length: fsdp over chips/4, mesh.context=4, and a global batch of chips/4 sequences. Memory per chip is
then a function of T alone, which is what the "memory grows at most linearly in T" check below reads.

    .venv/bin/python bench/aot_table.py                 # every row (~45 min on 2 cores: 2-5 min a row)
    .venv/bin/python bench/aot_table.py --only v5p      # the v5p-128 rows
    .venv/bin/python bench/aot_table.py --configs       # every shipped config by its own compile_only command
    .venv/bin/python bench/aot_table.py --finetune      # GLM-4-9B SFT / LoRA / P-Tuning memory (issue 15's table)
    .venv/bin/python bench/aot_table.py --moe           # GLM-4.5-Air / 4.5 / 4.6 with expert parallelism
    .venv/bin/python bench/aot_table.py --flops-fill    # XLA flops (1-/2-layer extrapolation) for rows without them
    .venv/bin/python bench/aot_table.py --quant-adapters  # GLM-4-9B P-Tuning / LoRA on an int4 / int8 base, one v5e
    .venv/bin/python bench/aot_table.py --markdown      # print the tables from bench/aot_*.json

Each row runs in its own process (one compile holds several GiB of host memory) and lands in bench/aot_table.json
with the commit it ran at, so a stopped run resumes where it stopped (rows of another commit are run again).
Flops: XLA's cost_analysis counts a scanned layer once, so glm-train extrapolates from unrolled 1- and 2-layer
compiles (measured), and cost_analysis sees nothing inside the Pallas kernel, whose flops are computed by formula
(FlashAttention-2's count, the causal/prefix half); the report says which is which. One extra row compiles the
8K GLM-4-9B step with XLA's attention (attention=xla) for the flops comparison with and without the kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

from aot_common import ROOT, commit, memory_cells, run_named, run_row, shape_cell
from aot_named import (
    FINETUNE_OUT,
    MOE_OUT,
    finetune_checks,
    finetune_markdown,
    moe_checks,
    moe_markdown,
    quant_main,
)

OUT = ROOT / "bench" / "aot_table.json"
CONFIGS_OUT = ROOT / "bench" / "aot_configs.json"

SLICES = {
    "v5p": ("v5p-128", "v5p:4x4x4", 64),
    "v6e": ("v6e-256", "v6e:16x16", 256),
    "v5e": ("v5e-256", "v5e:16x16", 256),
}
MODELS = [  # (label, preset, T)
    ("GLM-4-9B", "glm4_9b", 8192),
    ("GLM-4-9B", "glm4_9b", 32768),
    ("GLM-4-9B", "glm4_9b", 131072),
    ("ChatGLM3-6B", "chatglm3_6b", 8192),
    ("ChatGLM3-6B-32K", "chatglm3_6b_32k", 32768),
]
CONTEXT = 4


def rows(only=None, flops_all=False):
    out = []
    for key, (slice_name, topo, chips) in SLICES.items():
        if only and key not in only:
            continue
        for label, preset, T in MODELS:
            row = dict(slice=slice_name, topology=topo, chips=chips, label=label, model=preset, seq_len=T)
            # flops: XLA counts a scanned layer once, so the count takes 2 more compiles (unrolled 1 and 2 layers);
            # run for the 8K GLM-4-9B rows on v5p-128 (with and without the kernel), everywhere with --flops-all
            out.append(row | {"flops": (key == "v5p" and preset == "glm4_9b" and T == 8192) or flops_all})
        if key == "v5p":
            out.append(dict(out[-5], attention="xla"))  # GLM-4-9B 8K without the kernel
    return out


def overrides(row) -> list[str]:
    batch = row["chips"] // CONTEXT
    return [
        f"model={row['model']}",
        f"seq_len={row['seq_len']}",
        f"batch_size={batch}",
        "mesh.data=1",
        "mesh.fsdp=-1",
        f"mesh.context={CONTEXT}",
        "mesh.tensor=1",
        f"topology={row['topology']}",
        f"attention={row.get('attention', 'auto')}",
        "compile_only=true",
        f"flops_extrapolate={str(row['flops']).lower()}",
        "progress=none",
    ]


def key(row) -> str:
    return "|".join(o for o in overrides(row) if not o.startswith("flops_extrapolate="))


def config_checks() -> dict[str, list[str]]:
    """Each shipped config whose header gives its compile_only command: name -> that command's arguments."""
    out = {}
    for path in sorted((ROOT / "train" / "configs").glob("*.yaml")):
        for line in path.read_text().splitlines():
            m = re.match(r"#\s+glm-train --config (\S+) (.*compile_only=true.*)$", line)
            if m and m.group(1) == path.stem:
                out[path.stem] = (path.stem, m.group(2).split())
    return out


def fmt_row(row, res) -> str:
    att = "kernel" if row.get("attention", "auto") == "auto" else "XLA"
    head = f"| {row['label']} | {row['seq_len'] // 1024}K | {row['slice']} | {att} | {row['chips'] // CONTEXT} "
    if res is None or "error" in res:
        return head + memory_cells(res) + " |"
    xla = res["xla_over_model_flops"] if res.get("flops_extrapolated") else None
    tot = res["total_over_model_flops"]
    fl = (
        "—"
        if xla is None
        else (f"{xla:.2f}" if not res["attention_kernel"] else f"{xla:.2f} + {tot - xla:.2f} = {tot:.2f}")
    )
    return head + memory_cells(res) + f" {fl} |"


def markdown(table) -> str:
    lines = [
        "| model | T | slice | attention | global batch | GiB per chip | HBM GiB | fits | flops / model flops |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows():
        lines.append(fmt_row(row, table.get(key(row))))
    lines.append("")
    lines.append("Every row: mesh fsdp = chips/4 x context = 4, bf16 compute, fp32 params and Adam, full remat.")
    lines.append("flops / model flops: XLA's measured flops (+ the Pallas kernel's flops computed by formula = total)")
    lines.append(
        "over the model's 6·(matmul params) + 12·L·T·N·H per token (the PaLM count: dense attention, no causal"
    )
    lines.append(
        "half), so a kernel that skips masked blocks can come out under 1. —: not counted (XLA counts a scanned"
    )
    lines.append(
        "layer once; the unrolled 1-/2-layer extrapolation: --flops-fill for the rows without it, or --flops-all)."
    )
    lines += linear_check(table)
    return "\n".join(lines)


def linear_check(table) -> list[str]:
    """Memory per chip at fixed mesh and batch, across T: the growth factor per 4x T must be at most 4."""
    out = []
    for key_, (slice_name, _, _) in SLICES.items():
        mems = []
        for row in rows([key_]):
            res = table.get(key(row))
            kernel = row.get("attention", "auto") == "auto"
            if row["label"] == "GLM-4-9B" and kernel and res and res.get("peak_memory_bytes_per_device"):
                mems.append((row["seq_len"], res["peak_memory_bytes_per_device"]))
        if len(mems) < 2:
            continue
        steps = [f"{b[1] / a[1]:.2f}x for {b[0] // a[0]}x T" for a, b in zip(mems, mems[1:])]
        ok = all(b[1] / a[1] <= b[0] / a[0] for a, b in zip(mems, mems[1:]))
        out.append(f"GLM-4-9B on {slice_name}, memory per chip from T to 4T: {', '.join(steps)} "
                   f"({'at most linear' if ok else 'MORE than linear'}).")  # fmt: skip
    return out


def config_markdown(configs) -> str:
    lines = ["| config | slice | model | batch x T | GiB per chip | HBM GiB | fits |", "|---|---|---|---|---|---|---|"]
    for name, r in sorted(configs.items()):
        where = "" if "error" in r else f"{r['topology']} | {r['model']}"
        lines.append(f"| {name} | {where or ' | '} | {shape_cell(r)} " + memory_cells(r))
    return "\n".join(lines)


def flops_row(i: int) -> dict:
    """In this process: the extrapolated XLA flops of row i (the unrolled compiles of train.aot.extrapolated_flops,
    without compiling the whole step again), printed as JSON for --flops-fill."""
    from train import aot, parallel
    from train.config import build
    from train.trainer import model_config

    row = rows(flops_all=True)[i]
    with tempfile.TemporaryDirectory() as out:
        tc = build(str(ROOT / "train/configs/chatglm3_6b_pretrain.yaml"), [*overrides(row), f"output_dir={out}"])
    _, _, devices = aot.topology_devices(tc.topology)
    cfg, _ = model_config(tc)
    n_dev = parallel.build_mesh(tc.mesh, devices).devices.size
    try:
        total, per_layer, method = aot.extrapolated_flops(tc, cfg, devices, n_dev)
    except aot.DoesNotFit:
        return {"error": "the unrolled 1-/2-layer compiles do not fit"}
    return {"flops_xla_measured": total, "per_layer": per_layer, "method": method}


def flops_fill(table, head, also_unfit=False) -> None:
    """Rows compiled without the flops extrapolation get it now, one process a row; memory results stay as they are."""
    for i, row in enumerate(rows(flops_all=True)):
        res = table.get(key(row))
        if not res or "error" in res or res.get("flops_extrapolated") or res.get("flops_fill_failed") == head:
            continue
        if res.get("fits") is not True and not also_unfit:  # its unrolled 1-/2-layer compiles may still fit
            continue
        print(f"flops of row {i}: {' '.join(overrides(row))}", flush=True)
        cmd = [sys.executable, str(ROOT / "bench" / "aot_table.py"), "--flops-row", str(i)]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        lines = p.stdout.strip().splitlines()
        got = json.loads(lines[-1]) if p.returncode == 0 and lines else {"error": p.stderr.strip()[-300:]}
        if "error" in got:
            print("   ", got["error"], flush=True)
            res["flops_fill_failed"] = head
            OUT.write_text(json.dumps({"rows": table}, indent=1) + "\n")
            continue
        xla, model = got["flops_xla_measured"], res["model_flops_per_step"]
        total = xla + (res["flops_attention_kernel_computed"] or 0.0)
        res.update(flops_xla_measured=xla, flops_total=total, xla_over_model_flops=xla / model)
        res.update(total_over_model_flops=total / model, flops_extrapolated=True, flops_commit=head)
        res["flops_source"]["flops_xla_measured"] = f"measured: XLA cost_analysis() ({got['method']}; at {head})"
        OUT.write_text(json.dumps({"rows": table}, indent=1) + "\n")
        print(f"    XLA/model flops {xla / model:.2f}, with the kernel {total / model:.2f}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=list(SLICES), help="slices to run (default: all)")
    ap.add_argument("--flops-all", action="store_true", help="extrapolate flops on every slice, not only v5p-128")
    ap.add_argument("--configs", action="store_true", help="check the shipped configs by their own compile_only")
    ap.add_argument("--finetune", action="store_true", help="GLM-4-9B SFT / LoRA / P-Tuning memory, THUDM's lengths")
    ap.add_argument("--moe", action="store_true", help="GLM-4.5 / 4.5-Air / 4.6 pretraining steps with mesh.expert=8")
    ap.add_argument("--quant-adapters", action="store_true", help="GLM-4-9B P-Tuning / LoRA on int4 vs bf16, one v5e")
    ap.add_argument("--markdown", action="store_true", help="print the tables only (with --moe etc.: that one)")
    ap.add_argument("--flops-fill", action="store_true", help="extrapolated flops for the rows that lack them")
    ap.add_argument("--unfit-too", action="store_true", help="with --flops-fill: also the steps that do not fit")
    ap.add_argument("--flops-row", type=int, help=argparse.SUPPRESS)  # one row's flops, in its own process
    args = ap.parse_args(argv)
    if args.flops_row is not None:
        print(json.dumps(flops_row(args.flops_row)))
        return 0
    data = json.loads(OUT.read_text()) if OUT.exists() else {}
    head = commit()
    table = {k: v for k, v in data.get("rows", {}).items()}
    configs = json.loads(CONFIGS_OUT.read_text()) if CONFIGS_OUT.exists() else {}
    finetune = json.loads(FINETUNE_OUT.read_text()) if FINETUNE_OUT.exists() else {}
    if args.quant_adapters:
        return quant_main(args, head)
    if args.configs:
        print(config_markdown(configs if args.markdown else run_named(config_checks(), CONFIGS_OUT, head)))
        return 0
    if args.finetune:
        print(finetune_markdown(finetune if args.markdown else run_named(finetune_checks(), FINETUNE_OUT, head)))
        return 0
    if args.moe:
        moe = json.loads(MOE_OUT.read_text()) if MOE_OUT.exists() else {}
        print(moe_markdown(moe if args.markdown else run_named(moe_checks(), MOE_OUT, head)))
        return 0
    if args.flops_fill:
        flops_fill(table, head, args.unfit_too)
    elif not args.markdown:
        todo = rows(args.only, args.flops_all)
        for i, row in enumerate(todo, 1):
            k = key(row)
            old = table.get(k, {})
            if old.get("commit") == head and "error" not in old and (old.get("flops_extrapolated") or not row["flops"]):
                continue
            cmd = f"glm-train --config train/configs/chatglm3_6b_pretrain.yaml {' '.join(overrides(row))}"
            print(f"[{i}/{len(todo)}] {cmd}", flush=True)
            res = run_row("chatglm3_6b_pretrain", overrides(row)) | {"commit": head, "flops_extrapolated": row["flops"]}
            table[k] = res
            OUT.write_text(json.dumps({"rows": table}, indent=1) + "\n")
            print("   ", res.get("verdict") or res.get("error"), f"({res['seconds']:.0f} s)", flush=True)
    print()
    print(config_markdown(configs))
    print()
    print(finetune_markdown(finetune))
    print()
    print(moe_markdown(json.loads(MOE_OUT.read_text()) if MOE_OUT.exists() else {}))
    commits = sorted({v.get("commit") for v in table.values()})
    print(markdown(table))
    print(f"\nrows compiled at commit(s) {', '.join(c for c in commits if c)}; libtpu topologies on a CPU host.")
    fl = sorted({v["flops_commit"] for v in table.values() if v.get("flops_commit")})
    if fl:
        print(f"flops of the rows compiled without them extrapolated by --flops-fill at commit(s) {', '.join(fl)}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
