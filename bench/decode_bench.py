"""Greedy decoding tokens/s: glm-jax `lm.generate` vs transformers' `generate` on the same ~20M-param Glm weights.

    .venv/bin/python bench/decode_bench.py [--new 64] [--prompt 32] [--threads 2]

Also glm-jax with weight-only int8 / int4 layer linears (from_pretrained(quantize=), float32 compute), with the
share of new ids equal to transformers' greedy ids: through the CPU kernel (glm_jax/quant/cpu_kernel.py, "kernel",
the default; timed interleaved with the fp32 rows, so the ratios compare the same moments of a shared host) and
through XLA's dequantize-then-dot path ("XLA", GLM_JAX_QUANT_KERNEL=0, timed after them).

Both run on this CPU in the same process: transformers GlmForCausalLM (eager PyTorch, KV cache), and glm-jax
(one jitted prefill + lax.while_loop of decode steps over a preallocated KV cache). Compile time is excluded
for JAX (one warm-up call), as is PyTorch's first-call overhead.
"""

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(a.threads)
    import jax

    import glm_jax
    from glm_jax.quant import cpu_kernel as quant_cpu

    cfg = transformers.GlmConfig(
        vocab_size=8192,
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        pad_token_id=0,
        eos_token_id=[1],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.GlmForCausalLM(cfg).eval()
    nparams = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        lm = glm_jax.from_pretrained(d)
        lm16 = glm_jax.from_pretrained(d, dtype="bfloat16")
        quantized = {q: glm_jax.from_pretrained(d, quantize=q) for q in ("int8", "int4")}  # weight-only, fp32 compute
    print(f"model: Glm, {nparams / 1e6:.1f}M params, prompt {a.prompt}, {a.new} new tokens, {a.threads} threads")
    ok = quant_cpu.available()
    print(f"CPU quantized-matmul kernel: {'built' if ok else 'unavailable (' + quant_cpu._state['error'] + ')'}")
    floor, chain = weight_stream_floor(lm)
    print(
        f"floor: XLA's matrix-vector products over the fp32 weights a token needs take {floor * 1e3:.2f} ms "
        f"(independent, side by side) -> at most {1 / floor:.0f} tok/s per sequence at batch 1 in fp32"
    )
    print(
        f"       the same products one after another, each fed by the last (as in a decode step), take "
        f"{chain * 1e3:.2f} ms -> {1 / chain:.0f} tok/s (XLA:CPU runs each batch-1 product on one core)"
    )
    print(f"{'batch':>5} {'transformers tok/s':>19} {'glm-jax tok/s':>14} {'ratio':>6} {'same ids':>8}")
    rng = np.random.default_rng(0)
    for B in (1, 8):
        ids = rng.integers(2, 8000, size=(B, a.prompt))
        lm.generate(ids, max_new_tokens=a.new, eos_token_id=[-1])  # compile
        for lmq in quantized.values():  # with the CPU kernel (the default)
            lmq.generate(ids, max_new_tokens=a.new, eos_token_id=[-1])
        t_hf, t_jx, t_q, o_q = [], [], {q: [] for q in quantized}, {}
        for _ in range(a.repeats):  # interleaved, so that a change in the host's load hits every row alike
            t = time.perf_counter()
            with torch.no_grad():
                ref = model.generate(
                    torch.tensor(ids),
                    attention_mask=torch.ones(ids.shape, dtype=torch.long),
                    max_new_tokens=a.new,
                    min_new_tokens=a.new,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=0,
                ).numpy()
            t_hf.append(time.perf_counter() - t)
            t = time.perf_counter()
            out = lm.generate(ids, max_new_tokens=a.new, eos_token_id=[-1])
            t_jx.append(time.perf_counter() - t)
            for q, lmq in quantized.items():
                t = time.perf_counter()
                o_q[q] = lmq.generate(ids, max_new_tokens=a.new, eos_token_id=[-1])
                t_q[q].append(time.perf_counter() - t)
        hf, jx = B * a.new / min(t_hf), B * a.new / min(t_jx)
        print(f"{B:>5} {hf:>19.1f} {jx:>14.1f} {jx / hf:>5.2f}x {str(bool((out == ref).all())):>8}")
        lm16.generate(ids, max_new_tokens=a.new, eos_token_id=[-1])
        t = time.perf_counter()
        o16 = lm16.generate(ids, max_new_tokens=a.new, eos_token_id=[-1])
        b16 = B * a.new / (time.perf_counter() - t)
        print(f"{B:>5} {'(bf16 glm-jax)':>19} {b16:>14.1f} {b16 / hf:>5.2f}x {(o16 == ref).mean():>7.0%}")

        def row(name, tq, oq, B=B, ref=ref, hf=hf, jx=jx):
            bq = B * a.new / min(tq)
            agree = (np.asarray(oq)[:, a.prompt :] == ref[:, a.prompt :]).mean()
            print(f"{B:>5} {name:>19} {bq:>14.1f} {bq / hf:>5.2f}x {agree:>7.0%}   {bq / jx:.2f}x glm-jax fp32")

        for q in quantized:
            row(f"({q} kernel)", t_q[q], o_q[q])
        # XLA's dequantize-then-dot path, timed after the rows above (the switch is read when a step is traced)
        os.environ["GLM_JAX_QUANT_KERNEL"] = "0"
        jax.clear_caches()
        for q, lmq in quantized.items():
            lmq.generate(ids, max_new_tokens=a.new, eos_token_id=[-1])  # compile
            tq = []
            for _ in range(a.repeats):
                t = time.perf_counter()
                oq = lmq.generate(ids, max_new_tokens=a.new, eos_token_id=[-1])
                tq.append(time.perf_counter() - t)
            row(f"({q} XLA)", tq, oq)
        os.environ.pop("GLM_JAX_QUANT_KERNEL")
        jax.clear_caches()
    sys.stdout.flush()


def weight_stream_floor(lm):
    """(independent, chained) seconds for XLA:CPU to multiply one token's vector by every weight matrix a decode
    step touches (all but the embedding table). Independent: the products may run side by side, a lower bound
    on a batch-1 fp32 step. Chained: each product's input depends on the last one's output, as in a decode step,
    so they run one after another."""
    import jax
    import jax.numpy as jnp

    mats = [
        w.reshape(-1, w.shape[-1])
        for path, w in jax.tree_util.tree_leaves_with_path(lm.params)
        if w.ndim >= 2 and "embed" not in jax.tree_util.keystr(path)
    ]

    def chained(ms):
        s = jnp.float32(1.0)
        for m in ms:  # the next input is a function of this product: no two products can overlap
            s = jnp.tanh(jnp.sum(jnp.full((1, m.shape[0]), s, m.dtype) @ m))
        return s

    return tuple(
        _best(jax.jit(f), mats)
        for f in (lambda ms: sum(jnp.sum(jnp.ones((1, m.shape[0]), m.dtype) @ m) for m in ms), chained)
    )


def _best(f, *args, repeats=20):
    f(*args).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(*args).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return best


if __name__ == "__main__":
    main()
