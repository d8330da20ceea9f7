"""GLM-4.5 mixture-of-experts training steps per second: glm-train's jitted step vs transformers, and vs a dense
glm-jax twin with the same active parameters. Same model, same batches, one process.

One tiny-but-not-trivial GLM-4.5 (transformers Glm4MoeConfig at the sizes of the flags below: the first
--first-dense layers a dense SwiGLU, the rest --experts routed SwiGLU experts of width --moe-ffn behind the sigmoid
router with e_score_correction_bias, top --top-k of them chosen within the best --topk-group of --n-group expert
groups, plus --shared shared experts; q/k RMSNorm, attention bias, half the head dims rotated, routed scaling 2.5
as GLM-4.5; no MTP layer), a random transformers Glm4MoeForCausalLM (router weights of std 0.3 and a score bias of
std 0.1, so the routing has no near-ties), saved float32 to a temporary folder and read from it by both frameworks.
Its dense twin is the same architecture with every layer dense (first_k_dense_replace = layers), ffn width
top_k * moe_ffn + shared * moe_ffn: the width of the SwiGLU work a token does in a MoE layer (the dense first
layers of the MoE model have that width too unless --dense-ffn says otherwise), so that the two have the same
active parameters but for the router. Rows:
  jax   MoE    - glm-train's own step (train.trainer.Run on `model=<folder> objective=causal`: the jitted
                 train/step.py step: forward, backward, global-norm clip 1.0, AdamW, non-finite guard)
  torch MoE    - transformers Glm4MoeForCausalLM.from_pretrained(folder) with its default experts and attention
                 implementations (printed): forward (loss from labels) + backward + clip_grad_norm_(1.0) +
                 torch.optim.AdamW (bench/sft_bench.py's TorchRow)
  jax   dense  - glm-train's step on the dense twin's folder
AdamW b1 0.9, b2 0.999, eps 1e-8, no weight decay, constant learning rate 5e-5 in every row.

Data: the bundled corpus (glm_jax/data/corpus) encoded with the GLM-4 stand-in tokenizer of the test fixtures
(1014 ids, tests/fixtures/chat-templates/glm-4-9b-chat) and packed into [B, T] rows by glm-train's own causal
pipeline; every position carries a next-token target. The same batches go to every row: transformers gets
input_ids, position_ids and the targets as shift_labels (its loss then uses them unshifted: the same mean token
cross-entropy over the same B*T targets as glm-train's). No aux/balance loss in either (output_router_logits is
off in transformers; moe.aux_loss_weight and mtp_loss_weight at their default 0 in glm-train).

Float32 on the CPU, threads, OpenMP wait policy, host memory, warm-up, alternating rounds and medians as
bench/sft_bench.py (imported from there; see its docstring): each row runs batch 0 once (jax: the compile; the
loss and gradient norm are the sanity line), then the other batches once, untimed; then --rounds rounds alternate
the three rows, each running --steps steps on the same batches in the same order. Reported: per row the median
over rounds of steps/s and tokens/s (B*T per step), the ratios glm-jax MoE / transformers MoE and glm-jax MoE /
glm-jax dense twin, and the total and active params of both models (embedding and output layer included; active:
the routed experts counted top_k / experts of them).

On the CPU glm-jax's routed experts (glm_jax/model/moe.py grouped_swiglu) run the tiled grouped matmul of
glm_jax/model/grouped_matmul.py: jax's own CPU lowering of jax.lax.ragged_dot broadcasts the sorted rows to
[experts, rows, in] and runs one dense dot, --experts times the routed work (16x with the defaults; the glm-jax MoE
row was then 0.14-0.21x transformers), where the tile loop does the real work plus at most one row tile per expert.
TPU and GPU programs keep ragged_dot. With the defaults the run takes ~3 min on a 2-core host.

    .venv/bin/python bench/moe_bench.py [--batch 8] [--seq 256] [--rounds 3] [--steps 5] [--threads 2]
        [--hidden 256] [--layers 4] [--first-dense 1] [--heads 8] [--kv-heads 2] [--head-dim 32] [--experts 16]
        [--top-k 4] [--n-group 2] [--topk-group 1] [--shared 1] [--moe-ffn 256] [--dense-ffn 0] [--vocab 1024]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import sft_bench  # noqa: E402  (sets the XLA / OpenMP environment before jax and torch start)
from helpers.adapter_models import GLM4_TOK  # noqa: E402

# glm-train overrides of every jax row (the torch rows get the same from sft_bench.TorchRow)
HYPER = dict(
    learning_rate=sft_bench.LR_FULL,
    schedule="constant",
    warmup_steps=0,
    warmup_ratio=0,
    adam_b1=0.9,
    adam_b2=0.999,
    adam_eps=1e-8,
    weight_decay=0,
    grad_clip=1.0,
    dtype="float32",
    param_dtype="float32",
    steps=1000000,
    progress="none",
)


def active_ffn(a) -> int:
    return (a.top_k + a.shared) * a.moe_ffn


def build(folder, a, dense: bool) -> dict:
    """Writes the random Glm4MoeForCausalLM (dense: the twin) to folder; returns its total and active params."""
    import torch
    import transformers

    torch.manual_seed(1 if dense else 0)
    cfg = transformers.Glm4MoeConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.dense_ffn or active_ffn(a),
        moe_intermediate_size=a.moe_ffn,
        num_hidden_layers=a.layers,
        first_k_dense_replace=a.layers if dense else a.first_dense,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        head_dim=a.head_dim,
        n_routed_experts=a.experts,
        num_experts_per_tok=a.top_k,
        n_group=a.n_group,
        topk_group=a.topk_group,
        n_shared_experts=a.shared,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        use_qk_norm=True,
        attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5},
        max_position_embeddings=max(256, a.seq),
        num_nextn_predict_layers=0,
        pad_token_id=1000,  # the stand-in tokenizer's <|endoftext|>, <|user|>, <|observation|>
        eos_token_id=[1000, 1007, 1008],
        tie_word_embeddings=False,
    )
    model = transformers.Glm4MoeForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None:  # clear routing preferences (the default std 0.02 makes near-ties)
                gate.weight.normal_(0.0, 0.3)
                gate.e_score_correction_bias.normal_(0.0, 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    return {"total": total, "active": total - routed + routed * a.top_k // a.experts}


class JaxCausalRow(sft_bench.JaxRow):
    """sft_bench's glm-train row, on the causal objective and the bundled corpus."""

    def __init__(self, folder, out, a):
        from train.config import build as build_config
        from train.trainer import Run

        over = {
            "model": folder,
            "objective": "causal",
            "data.tokenizer": GLM4_TOK,
            "seq_len": a.seq,
            "batch_size": a.batch,
            "output_dir": out,
            **HYPER,
        }
        self.run = Run(build_config(None, [f"{k}={v}" for k, v in over.items()]))


class TorchCausalRow(sft_bench.TorchRow):
    """sft_bench's transformers row (no adapter) on causal batches: targets as shift_labels, no cache."""

    def put(self, local: list) -> None:
        import numpy as np
        import torch

        def convert(b):
            tokens = torch.tensor(b["tokens"], dtype=torch.long)
            shift = np.where(b["loss_mask"] > 0, b["targets"], -100)
            return {
                "input_ids": tokens,
                "position_ids": torch.tensor(b["position_ids"], dtype=torch.long),
                "labels": tokens,  # switches the loss on; shift_labels wins over it
                "shift_labels": torch.tensor(shift, dtype=torch.long),
                "use_cache": False,
            }

        self.dev = [convert(b) for b in local]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    flags = {
        "batch": 8,
        "seq": 256,
        "rounds": 3,
        "steps": 5,
        "threads": 2,
        "hidden": 256,
        "layers": 4,
        "first-dense": 1,
        "heads": 8,
        "kv-heads": 2,
        "head-dim": 32,
        "experts": 16,
        "top-k": 4,
        "n-group": 2,
        "topk-group": 1,
        "shared": 1,
        "moe-ffn": 256,
        "dense-ffn": 0,
        "vocab": 1024,
    }
    for name, default in flags.items():
        ap.add_argument(f"--{name}", type=int, default=default)
    a = ap.parse_args()
    print(("$ .venv/bin/python bench/moe_bench.py " + " ".join(sys.argv[1:])).rstrip(), flush=True)

    from glm_jax import hostmem

    kept = hostmem.apply("auto")
    import torch

    torch.set_num_threads(a.threads)
    import jax
    import transformers

    tmp = tempfile.TemporaryDirectory(prefix="moe_bench_")
    root = pathlib.Path(tmp.name)
    t = time.perf_counter()
    n_moe = build(root / "moe", a, dense=False)
    n_dense = build(root / "dense", a, dense=True)
    jmoe = JaxCausalRow(root / "moe", root / "run_moe", a)
    jdense = JaxCausalRow(root / "dense", root / "run_dense", a)
    local = jmoe.batches(a.steps)  # every row trains on these, in this order, every round
    tmoe = TorchCausalRow(root / "moe", None)
    for r in (jmoe, jdense, tmoe):
        r.put(local)
    t_setup = time.perf_counter() - t

    tc = tmoe.model.config
    rows = [
        ("glm-jax MoE (glm-train step)", jmoe),
        (f"transformers MoE ({tmoe.kind})", tmoe),
        ("glm-jax dense twin (glm-train step)", jdense),
    ]
    B, T = a.batch, a.seq
    print(
        f"MoE: hidden {a.hidden}, {a.layers} layers ({a.first_dense} dense, ffn {a.dense_ffn or active_ffn(a)}), "
        f"{a.heads} heads ({a.kv_heads} kv) x {a.head_dim}, {a.experts} routed experts top-{a.top_k} "
        f"(n_group {a.n_group}, topk_group {a.topk_group}) + {a.shared} shared, moe ffn {a.moe_ffn}, vocab "
        f"{a.vocab}: {n_moe['total'] / 1e6:.2f}M params total, {n_moe['active'] / 1e6:.2f}M active"
    )
    print(
        f"dense twin: the same with {a.layers} dense layers of ffn {active_ffn(a)} = ({a.top_k} + {a.shared}) x "
        f"{a.moe_ffn}: {n_dense['total'] / 1e6:.2f}M params total = active"
    )
    print(f"data: bundled corpus, causal, batch {B} x seq {T} = {B * T} tokens/step (all with targets)")
    print(
        f"float32, CPU: jax {jax.__version__} ({jax.device_count()} device, XLA default threads), torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads, OMP_WAIT_POLICY {os.environ['OMP_WAIT_POLICY']}), "
        f"transformers {transformers.__version__} (experts {tc._experts_implementation}, attention "
        f"{tc._attn_implementation}), {os.cpu_count()} cores; freed host memory "
        f"{'kept for reuse' if kept else 'returned to the system'}; setup {t_setup:.1f}s",
        flush=True,
    )

    first = sft_bench.warm_up(rows, a.steps, 50)
    jm, tm, jd = (first[n] for n, _ in rows)
    print(
        f"sanity (same weights, same batch 0): MoE loss jax {jm['loss']:.6f} torch {tm['loss']:.6f} |diff| "
        f"{abs(jm['loss'] - tm['loss']):.2e}, grad norm jax {jm['grad_norm']:.6f} torch {tm['grad_norm']:.6f} "
        f"|diff| {abs(jm['grad_norm'] - tm['grad_norm']):.2e}; dense twin (other weights) loss {jd['loss']:.6f}",
        flush=True,
    )

    med = sft_bench.timed_rounds(rows, a.rounds, a.steps, B * T, 50)
    nm, nt, nd = (n for n, _ in rows)
    print(
        f"glm-jax MoE / transformers MoE: {med[nm] / med[nt]:.2f}x; glm-jax MoE / glm-jax dense twin (same active "
        f"params): {med[nm] / med[nd]:.2f}x (steps/s, medians)"
    )
    for r in (jmoe, jdense):
        r.close()
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
