"""Blank-infilling data pipeline throughput per CPU core vs. what one TPU v5p host needs for GLM-4-9B.

    .venv/bin/python bench/data_bench.py [--seconds 8] [--seq-lens 1024 8192] [--workers 0]

Measures the whole pipeline in one process (read array_record -> tokenize -> pack -> sample spans ->
layout -> batch), bundled corpus and bundled sentencepiece tokenizer, GLM-10B objective mixture.
Tokens counted = B x T per batch (what the trainer consumes); the non-padding share is printed too.

Need of one host (v5p: 4 chips per host, bf16 dense peak 459 TFLOP/s per chip, at 50 % MFU):
    host_flops = 4 * 459e12 * 0.5 = 9.18e14 FLOP/s
    flops/token = 6 * N + 12 * L * T * d_attn            (PaLM appendix B convention)
      N = 9.4e9 params, L = 40 layers, d_attn = 32 heads * 128 = 4096 (GLM-4-9B)
    need = host_flops / (flops/token)                    tokens/s per host
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

PEAK_BF16_PER_CHIP = 459e12
CHIPS_PER_HOST = 4
MFU = 0.5
N_PARAMS, N_LAYERS, D_ATTN = 9.4e9, 40, 32 * 128


def host_need(seq_len: int) -> tuple[float, float]:
    flops_per_token = 6 * N_PARAMS + 12 * N_LAYERS * seq_len * D_ATTN
    return CHIPS_PER_HOST * PEAK_BF16_PER_CHIP * MFU / flops_per_token, flops_per_token


def measure(seq_len: int, batch_size: int, seconds: float, workers: int, seed: int) -> dict:
    from glm_jax import data

    cfg = dict(
        objective="blank_infilling",
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        shard_index=0,
        shard_count=1,
        num_workers=workers,
    )
    with data.make_pipeline(cfg) as pipe:
        for _ in range(2):
            next(pipe)  # warm-up (worker start, caches)
        cpu0, t0, n, real = time.process_time(), time.perf_counter(), 0, 0
        while time.perf_counter() - t0 < seconds:
            batch = next(pipe)
            n += batch["tokens"].size
            real += int((batch["tokens"] != 0).sum())
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        stats = pipe.stats
    return {
        "tokens_per_s": n / wall,
        "tokens_per_cpu_s": n / max(cpu, 1e-9),
        "nonpad": real / max(n, 1),
        "batches": stats["batches"],
        "rows_token": stats["rows_token"],
        "rows_sentence": stats["rows_sentence"],
        "rows_document": stats["rows_document"],
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--tokens-per-batch", type=int, default=32768)
    ap.add_argument("--workers", type=int, default=0, help="grain worker processes (0: measure one core)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(
        f"host need: {CHIPS_PER_HOST} x {PEAK_BF16_PER_CHIP / 1e12:.0f} TFLOP/s x {MFU:.0%} MFU = "
        f"{CHIPS_PER_HOST * PEAK_BF16_PER_CHIP * MFU:.3g} FLOP/s; flops/token = 6N + 12*L*T*d_attn, "
        f"N={N_PARAMS:.2g}, L={N_LAYERS}, d_attn={D_ATTN}"
    )
    print(
        f"{'seq_len':>8} {'B':>4} {'tok/s':>10} {'tok/cpu-s':>10} {'nonpad':>7} {'flops/tok':>10} "
        f"{'need tok/s':>10} {'ratio/core':>10}  objectives(token/sentence/document rows)"
    )
    for T in args.seq_lens:
        B = max(1, args.tokens_per_batch // T)
        r = measure(T, B, args.seconds, args.workers, args.seed)
        need, fpt = host_need(T)
        # one process without workers = one core: CPU seconds are immune to other load on the machine
        per_core = r["tokens_per_s"] / args.workers if args.workers else r["tokens_per_cpu_s"]
        print(
            f"{T:>8} {B:>4} {r['tokens_per_s']:>10.0f} {r['tokens_per_cpu_s']:>10.0f} {r['nonpad']:>7.3f} "
            f"{fpt:>10.3g} {need:>10.0f} {per_core / need:>9.1f}x  "
            f"{r['rows_token']}/{r['rows_sentence']}/{r['rows_document']}"
        )
    print(
        "ratio/core = one CPU core's pipeline throughput (tok/cpu-s; wall tok/s / workers with --workers)"
        " / one v5p host's need (target >= 10x)."
    )


if __name__ == "__main__":
    main()
