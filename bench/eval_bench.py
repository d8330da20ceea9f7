"""lm-eval loglikelihood requests per second: glm-jax's "glm-jax" backend vs lm-eval's own "hf" backend, in the
same process on the same random Glm4ForCausalLM checkpoint folder (5.2M params, 4096 vocab).

    .venv/bin/python bench/eval_bench.py [--requests 256] [--batch-size 16] [--threads 2] [--repeats 3]

Two workloads: distinct contexts, and 4 continuations per context (a multiple-choice task, which glm-jax
packs into one row per context). Both backends get the same lm-eval Instances (contexts of 10-120 random
words, continuations of 1-6 words) and tokenize them themselves. Each is called once to warm up (glm-jax: XLA
compiles one program per batch shape; that first call is reported separately), then both are timed in turn
for `--repeats` rounds; the best run of each counts. Also writes bench/figures/needle_tiny.png, the needle
grid of a tiny model (--no-needle: skip).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tiny-checkpoint builder the tests use


def make_requests(n: int, choices: int = 1, seed: int = 0):
    """n loglikelihood Instances: contexts of 10-120 random words, continuations of 1-6 words; with choices > 1,
    n // choices contexts with `choices` continuations each (a multiple-choice task's shape)."""
    from helpers import eval_models
    from lm_eval.api.instance import Instance

    rng = random.Random(seed)
    words = " ".join(eval_models.SENTENCES).split()
    out = []
    while len(out) < n:
        ctx = " ".join(rng.choice(words) for _ in range(rng.randint(10, 120)))
        for _ in range(min(choices, n - len(out))):
            cont = " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
            out.append(Instance("loglikelihood", {}, (ctx, cont), len(out)))
    return out


def alternate(fns, repeats: int):
    """One warm-up call of each fn (timed), then `repeats` rounds calling them in turn: (first-call seconds,
    best seconds, last result) per fn. Alternating spreads a shared machine's noise over both."""
    warm, best, out = [], [float("inf")] * len(fns), [None] * len(fns)
    for f in fns:
        t0 = time.perf_counter()
        f()
        warm.append(time.perf_counter() - t0)
    for _ in range(repeats):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            out[i] = f()
            best[i] = min(best[i], time.perf_counter() - t0)
    return warm, best, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-needle", action="store_true")
    a = ap.parse_args()
    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    from helpers import eval_models
    from lm_eval.models.huggingface import HFLM

    from glm_jax.eval.harness import GLMLM

    print("command: .venv/bin/python bench/eval_bench.py " + " ".join(sys.argv[1:]))
    with tempfile.TemporaryDirectory() as d:
        model = eval_models.build_glm4(
            d, hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, ffn=768, max_pos=1024, vocab=4096, scale=1.0
        )
        nparams = sum(p.numel() for p in model.parameters())
        del model
        ours = GLMLM(pretrained=d, batch_size=a.batch_size)
        hf = HFLM(pretrained=d, device="cpu", dtype="float32", batch_size=a.batch_size)
        print(
            f"model: Glm4ForCausalLM {nparams / 1e6:.1f}M params, 4096 vocab; batch size {a.batch_size}; "
            f"{a.threads} torch threads; best of {a.repeats} alternating rounds"
        )
        for name, choices in (("distinct contexts", 1), ("4 choices per context", 4)):
            reqs = make_requests(a.requests, choices)
            ntok = sum(len(c) + len(x) for c, x in (ours._encode_pair(*r.args) for r in reqs))
            rows0, shapes0 = ours.scorer.rows, set(ours.scorer.shapes)
            (warm_j, warm_h), (t_j, t_h), (res_j, res_h) = alternate(
                [
                    lambda: ours.loglikelihood(reqs, disable_tqdm=True),  # noqa: B023 (called inside the loop)
                    lambda: hf.loglikelihood(reqs, disable_tqdm=True),  # noqa: B023
                ],
                a.repeats,
            )
            gap = float(np.max(np.abs(np.array([x[0] for x in res_j]) - np.array([x[0] for x in res_h]))))
            rows = (ours.scorer.rows - rows0) // (a.repeats + 1)
            print(f"\n{name}: {len(reqs)} requests, {ntok} tokens (glm-jax: {rows} rows per pass)")
            print(f"  glm-jax: {len(reqs) / t_j:7.1f} req/s  ({t_j:.2f} s; first pass with compiles {warm_j:.2f} s, "
                  f"{len(ours.scorer.shapes - shapes0)} new shapes)")  # fmt: skip
            print(f"  hf     : {len(reqs) / t_h:7.1f} req/s  ({t_h:.2f} s; first pass {warm_h:.2f} s)")
            print(f"  ratio  : glm-jax / hf = {t_h / t_j:.2f}x   (max |d loglikelihood| {gap:.1e})")

    if not a.no_needle:
        needle_png()


def needle_png():
    from helpers import eval_models

    import glm_jax
    from glm_jax.eval import needle
    from glm_jax.eval.tokenizer import EvalTokenizer

    with tempfile.TemporaryDirectory() as d:
        eval_models.build_glm4(d)
        lm = glm_jax.from_pretrained(d)
        res = needle.run_grid(lm, EvalTokenizer(d), [128, 256, 512], [0.0, 0.25, 0.5, 0.75, 1.0], max_new_tokens=8)
    png = needle.heatmap(res, ROOT / "bench" / "figures" / "needle_tiny.png", title="tiny random Glm4")
    print(f"needle: mean recall {res['mean_recall']:.2f} (a random tiny model: expected 0); wrote {png}")


if __name__ == "__main__":
    main()
