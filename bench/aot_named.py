"""The named compile_only tables of the README, each a set of glm-train runs by name (bench/aot_table.py --finetune,
--moe, --quant-adapters runs them and prints them): GLM-4-9B finetuning at THUDM's settings, GLM-4.5 / 4.6 with
expert parallelism, and GLM-4-9B adapters on an int4 / int8 base on one v5e chip."""

from __future__ import annotations

import json

from aot_common import ROOT, memory_cells, run_named, shape_cell

FINETUNE_OUT = ROOT / "bench" / "aot_finetune.json"
MOE_OUT = ROOT / "bench" / "aot_moe.json"


# GLM-4-9B finetuning at THUDM's GLM-4 finetune_demo settings (configs/{sft,lora,ptuning_v2}.yaml: 512 + 512 tokens,
# 4 rows per GPU for SFT and 1 for LoRA; 128 + 128 and 4 rows for P-Tuning v2, here with pre_seq_len 128), beside
# the GPU memory its README reports on A100-SXM4-80GB. "one v5p chip": the first chip of a v5p-8 host (libtpu
# describes no smaller v5p topology) with a one-device mesh.
THUDM_MIB = {
    "SFT": "80,935 MiB per GPU, 8 GPUs (ZeRO-3)",
    "LoRA": "21,531 MiB (1 GPU)",
    "P-Tuning": "21,381 MiB (1 GPU)",
}
FT_METHODS = [  # (method, config, extra args, rows per chip, T)
    ("SFT", "glm4_9b_chat_sft", [], 4, 1024),
    ("LoRA", "glm4_9b_chat_lora", [], 1, 1024),
    ("P-Tuning", "chatglm3_6b_ptuning", ["ptuning.pre_seq_len=128"], 4, 256),
]
FT_SLICES = [("one v5p chip", "v5p:2x2x1", 1), ("v5e-8", "v5e:2x4", 8)]


def finetune_checks() -> dict[str, tuple[str, list[str]]]:
    out = {}
    for method, config, extra, per_chip, T in FT_METHODS:
        for where, topo, chips in FT_SLICES:
            fsdp = f"mesh.fsdp={chips}"
            args = ["model=glm4_9b", f"topology={topo}", "mesh.data=1", fsdp, "mesh.context=1", "mesh.tensor=1"]
            args += [f"batch_size={per_chip * chips}", f"seq_len={T}", *extra, "compile_only=true"]
            out[f"{method} | {where}"] = (config, args)
    return out


# GLM-4.5 / 4.6 (MoE) pretraining steps at 4K tokens: the experts split 8 ways (mesh.expert=8), FSDP over the
# rest, one sequence per chip; bf16 compute, fp32 params and Adam, full remat (the pretraining recipe).
MOE = [("GLM-4.5-Air", "glm4_5_air", "v5p-128", "v5p:4x4x4", 64),
       ("GLM-4.5-Air", "glm4_5_air", "v5p-256", "v5p:4x4x8", 128),
       ("GLM-4.5", "glm4_5", "v5p-512", "v5p:4x8x8", 256), ("GLM-4.5", "glm4_5", "v6e-256", "v6e:16x16", 256),
       ("GLM-4.6", "glm4_6", "v5p-512", "v5p:4x8x8", 256)]  # fmt: skip


def moe_checks() -> dict[str, tuple[str, list[str]]]:
    out = {}
    for label, preset, slice_name, topo, chips in MOE:
        args = [f"model={preset}", f"topology={topo}", "mesh.data=1", "mesh.fsdp=-1", "mesh.expert=8"]
        args += ["mesh.context=1", "mesh.tensor=1", f"batch_size={chips}", "seq_len=4096", "compile_only=true"]
        args += ["flops_extrapolate=true"]  # XLA flops of the whole step: unrolled (dense + 1)- and (dense + 2)-layer
        out[f"{label} | {slice_name}"] = ("chatglm3_6b_pretrain", args)
    return out


def moe_markdown(res) -> str:
    lines = [
        "| model | slice | mesh | batch x T | GiB per chip | HBM GiB | fits | XLA flops / active-param model flops |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in moe_checks():
        r = res.get(name)
        label, where = name.split(" | ")
        mesh = "" if r is None or "error" in r else " ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1)
        ratio = None if r is None or "error" in r else r.get("xla_over_model_flops")
        extra = "" if r is None or "error" in r or "extrapolated" in r["flops_source"]["flops_xla_measured"] else "*"
        flops = "—" if ratio is None else f"{ratio:.2f}{extra}"
        lines.append(f"| {label} | {where} | {mesh} | {shape_cell(r)} " + memory_cells(r) + f" {flops} |")
    lines.append("")
    lines += [
        "Model flops: 6·(active matmul params: routed experts at top-k / E, shared experts, dense layers,",
        "attention, router, head) + 12·L·T·N·H per token; the MTP layer is not trained here (mtp_loss_weight=0).",
        "XLA flops: cost_analysis() of unrolled (dense + 1)- and (dense + 2)-layer compiles, extrapolated to L",
        "layers (*: the step as compiled, the scanned layer counted once: the unrolled compiles did not fit).",
    ]
    return "\n".join(lines)


def finetune_markdown(res) -> str:
    lines = [
        "| GLM-4-9B | slice | batch x T | GiB per chip | HBM GiB | fits | THUDM on A100-80GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in finetune_checks():
        r = res.get(name)
        method, where = name.split(" | ")
        lines.append(f"| {method} | {where} | {shape_cell(r)} " + memory_cells(r) + f" {THUDM_MIB[method]} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- --quant-adapters (issue 18)
# GLM-4-9B P-Tuning v2 and LoRA (THUDM's finetune lengths, FT_METHODS) on ONE v5e chip (16 GiB): the base in bf16
# against the same base with its layer linears int4 / int8 (glm-train quantize=, train/quant_base.py); the adapter
# float32 and its Adam state, bf16 compute, the rest of each config as shipped. libtpu describes no v5e:1x1
# topology, so "one v5e chip" is the first chip of v5e:2x2 with a one-device mesh, as --finetune does for v5p.
QUANT_OUT = ROOT / "bench" / "aot_quant.json"
QUANT_TOPOLOGY = "v5e:2x2"
QUANT_BASES = [("bf16", []), ("int4", ["quantize=int4"]), ("int8", ["quantize=int8"])]
# XLA refuses the bf16 steps for one v5e chip with a figure from its out-of-memory message; the same steps compiled
# for one v5p chip (95 GiB) say what they hold where they fit
QUANT_WIDE = ("bf16, one v5p chip", "v5p:2x2x1")


def quant_checks() -> dict[str, tuple[str, list[str]]]:
    out = {}
    methods = [m for m in FT_METHODS if m[0] != "SFT"]  # quantize= trains adapters only
    for bases in (QUANT_BASES[:2], QUANT_BASES[2:]):  # bf16 and int4 first, int8 after
        for method, config, margs, per_chip, T in methods:
            for base, extra in bases:
                args = ["model=glm4_9b", f"topology={QUANT_TOPOLOGY}", "mesh.data=1", "mesh.fsdp=1", "mesh.context=1"]
                args += ["mesh.tensor=1", f"batch_size={per_chip}", f"seq_len={T}", *margs, "param_dtype=bfloat16"]
                out[f"{method} | {base}"] = (config, args + extra + ["compile_only=true"])
    for method, config, *_ in methods:
        args = [a.replace(QUANT_TOPOLOGY, QUANT_WIDE[1]) for a in out[f"{method} | bf16"][1]]
        out[f"{method} | {QUANT_WIDE[0]}"] = (config, args)
    return out


def quant_markdown(res) -> str:
    lines = [
        "| GLM-4-9B, one v5e chip | base | batch x T | GiB per chip | HBM GiB | fits | GiB from |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in ("P-Tuning", "LoRA"):
        for base in [b for b, _ in QUANT_BASES] + [QUANT_WIDE[0]]:
            r = res.get(f"{method} | {base}")
            src = (r or {}).get("memory_source") or ""
            src = "the compiled step" if src.startswith("memory_analysis") else ("XLA's refusal" if src else "")
            lines.append(f"| {method} | {base} | {shape_cell(r)} " + memory_cells(r) + f" {src} |")
    commits = sorted({r.get("commit") for r in res.values() if r.get("commit")})
    where = f"libtpu's {QUANT_TOPOLOGY} (v5p: {QUANT_WIDE[1]}), one device"
    lines.append(f"\ncompile_only at commit(s) {', '.join(commits) or '-'}; {where}.")
    return "\n".join(lines)


def quant_main(args, head) -> int:
    """--quant-adapters: run the rows not yet done at this commit (--markdown: only print bench/aot_quant.json)."""
    res = json.loads(QUANT_OUT.read_text()) if QUANT_OUT.exists() else {}
    print(quant_markdown(res if args.markdown else run_named(quant_checks(), QUANT_OUT, head)))
    return 0
