"""Train-step throughput on this host: glm-train's jitted step vs transformers' PyTorch GlmForCausalLM.

Rows, all at the default config's batch and sequence length (train/configs/default.yaml), in one run:
  jax  default  - the default model (preset glm_small: learned 2-D positions, GELU, tied embeddings) with the
                  full glm-train step (AdamW, clipping, non-finite guard), blank-infilling shaped batch
  jax  glm-hf   - our model configured exactly as transformers' GlmForCausalLM at the same sizes
  torch glm-hf  - transformers GlmForCausalLM (same GlmConfig), forward + backward + clip + torch.optim.AdamW

Every row trains on the same kind of batch: loss on a random 30% of the positions (blank infilling puts it on
Part B only). transformers projects every position to the vocabulary and drops the rest in its loss; glm-train
projects only the loss positions (loss_select, packed into n/8, 3n/16, ..., n/2, 3n/4 or n slots per batch
shard, train/loss.py pack_caps): same loss, less work. Model FLOP/s below count the full projection for every
row alike (the conventional MFU count).

Achieved FLOP/s counts model flops (6·matmul params + 12·L·T·N·H per token; train/flops.py flops_per_token)
and is given as a fraction of this CPU's float32 matmul peak, measured in the same run with jnp (and with
torch for the torch row's own reference).

The process runs with glm-train's host memory setting (host_heap, glm_jax/hostmem.py: freed heap memory kept
for reuse, so XLA:CPU's per-step temp buffer is not page-faulted in again every step); it applies to both
frameworks alike. --host-heap system measures with glibc's defaults instead.

    .venv/bin/python bench/train_bench.py [--rounds 4] [--steps 3] [--batch 16] [--seq 128] [--threads 2]
                                          [--host-heap auto|keep|system]
"""

from __future__ import annotations

import argparse
import math
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def torch_matmul_peak(sizes=(1024, 2048), repeats=6) -> float:
    import torch

    best = 0.0
    for n in sizes:
        x = torch.full((n, n), 0.01)
        x @ x
        for _ in range(repeats):
            t = time.perf_counter()
            x @ x
            best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def jax_runner(cfg, B, T):
    """A callable running one glm-train step (compiled on creation); returns the loss."""
    import jax
    import numpy as np

    from glm_jax.model.transformer import init_params
    from glm_jax.sharding import axis_rules
    from train import parallel
    from train.config import build
    from train.trainer import state_layout

    tc = build("default", [f"batch_size={B}", f"seq_len={T}", "mesh.data=1"])
    mesh = parallel.build_mesh(tc.mesh)
    lay = state_layout(tc, cfg, mesh)
    rng = np.random.default_rng(0)
    two_d = cfg.positions_2d
    batch = {
        "tokens": rng.integers(0, 8000, (B, T)).astype(np.int32),
        "targets": rng.integers(0, 8000, (B, T)).astype(np.int32),
        "loss_mask": (rng.random((B, T)) < 0.3).astype(np.float32),
        "position_ids": (
            np.broadcast_to(np.arange(T, dtype=np.int32), (B, 2, T))
            if two_d
            else np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
        ).copy(),
        "prefix_len": np.full((B,), T // 2 if two_d else 0, np.int32),
    }
    from train.step import init_state

    with jax.set_mesh(mesh), axis_rules():
        state = jax.jit(lambda k: init_state(init_params(cfg, k), lay["tx"]), out_shardings=lay["state_sh"])(
            jax.random.PRNGKey(0)
        )
        b_sh = parallel.batch_shardings(mesh, {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()})
        batch = {k: jax.device_put(v, b_sh[k]) for k, v in batch.items()}
        fn = jax.jit(
            lay["train_step"],
            in_shardings=(lay["state_sh"], b_sh),
            out_shardings=(lay["state_sh"], None),
            donate_argnums=(0,),
        )
    box = {"state": state}

    def step():
        with jax.set_mesh(mesh), axis_rules():
            box["state"], m = fn(box["state"], batch)
        return float(m["loss"])  # waits for the step

    step()
    return step


def torch_config(cfg):
    from transformers import GlmConfig

    return GlmConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        attention_bias=cfg.qkv_bias,
        max_position_embeddings=max(cfg.max_position_embeddings, 2048),
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": cfg.rope_dim / cfg.head_dim,
        },
        pad_token_id=0,
        eos_token_id=2,
    )


def torch_runner(cfg, B, T):
    """A callable running one PyTorch GlmForCausalLM train step on the same kind of batch as the jax rows
    (random tokens and targets, loss on a random 30% of positions: labels -100 elsewhere); returns the loss."""
    import numpy as np
    import torch
    from transformers import GlmForCausalLM

    torch.manual_seed(0)
    model = GlmForCausalLM(torch_config(cfg)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(0)
    ids = torch.tensor(rng.integers(0, 8000, (B, T)))
    labels = torch.tensor(np.where(rng.random((B, T)) < 0.3, rng.integers(0, 8000, (B, T)), -100))

    def step():
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    step()
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="steps per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--batch", type=int, default=0, help="0: the default config's batch_size")
    ap.add_argument("--seq", type=int, default=0, help="0: the default config's seq_len")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--host-heap",
        choices=("auto", "keep", "system"),
        default="auto",
        help="glm-train's host_heap key, applied to this whole process (both frameworks alike)",
    )
    args = ap.parse_args()
    from glm_jax import hostmem

    kept = hostmem.apply(args.host_heap)  # as glm-train does, before either framework starts its threads
    import torch

    torch.set_num_threads(args.threads)
    from train.config import build
    from train.flops import flops_per_token
    from train.metrics import measure_matmul_peak
    from train.trainer import model_config

    tc = build("default", [])
    B, T = args.batch or tc.batch_size, args.seq or tc.seq_len
    cfg, _ = model_config(tc)
    from glm_jax.config import GLMConfig

    hf = GLMConfig.from_hf(torch_config(cfg).to_dict())
    peak_jax, peak_torch = measure_matmul_peak(), torch_matmul_peak()
    runners = [
        ("jax   default (glm_small)", cfg, jax_runner(cfg, B, T)),
        ("jax   glm-hf twin", hf, jax_runner(hf, B, T)),
        ("torch GlmForCausalLM", hf, torch_runner(hf, B, T)),
    ]
    # this host is shared: rounds alternate between the three so that load changes hit all of them alike
    times = {name: [] for name, _, _ in runners}
    losses = {}
    for _ in range(args.rounds):
        # the peak is re-measured every round (best kept), as the steps are: a busy moment lowers neither alone
        peak_jax, peak_torch = (
            max(peak_jax, measure_matmul_peak(repeats=3)),
            max(peak_torch, torch_matmul_peak(repeats=3)),
        )
        for name, _, run in runners:
            for _ in range(args.steps):
                t = time.perf_counter()
                losses[name] = run()
                times[name].append(time.perf_counter() - t)
    print(
        f"batch {B} x seq {T} = {B * T} tokens/step; float32 matmul peak (best of the run): jax "
        f"{peak_jax / 1e9:.1f} GFLOP/s, torch {peak_torch / 1e9:.1f} GFLOP/s ({args.threads} threads); freed host "
        f"memory {'kept for reuse' if kept else 'returned to the system'} (host_heap={args.host_heap})"
    )
    rows = []
    for name, c, _ in runners:
        ts = sorted(times[name])
        best, med = ts[0], ts[len(ts) // 2]
        flops = flops_per_token(c, T) * B * T
        rows.append((name, best, med))
        print(
            f"{name:28s} best {best * 1e3:7.1f} ms/step (median {med * 1e3:7.1f})  {B * T / best:7.0f} tok/s  "
            f"{flops / best / 1e9:6.1f} GFLOP/s = {100 * flops / best / peak_jax:5.1f}% of jax matmul peak "
            f"(median {100 * flops / med / peak_jax:4.1f}%)  loss {losses[name]:.3f}",
            flush=True,
        )
    (_, bj, mj), (_, bh, mh), (_, bt, mt) = rows
    print(
        f"tokens/s vs torch (best / median step): default model {bt / bj:.2f}x / {mt / mj:.2f}x, "
        f"glm-hf twin {bt / bh:.2f}x / {mt / mh:.2f}x   (targets: >= 1.25x torch, >= 70% of matmul peak)"
    )
    return 0 if all(math.isfinite(v) for v in losses.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
