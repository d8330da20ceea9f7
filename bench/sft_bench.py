"""SFT training steps per second: glm-train's jitted step vs transformers + peft, same model, same batches.

One process, one tiny GLM-4 chat base (tests/helpers/adapter_models.py build_glm4_chat: a random transformers
Glm4ForCausalLM with the GLM-4 stand-in tokenizer, float32, written to a temporary folder at the sizes of the
flags below), read by both frameworks from that folder. Rows:
  jax   full SFT  - glm-train's own step (train.trainer.Run on `model=<folder> objective=sft`: the jitted
                    train/step.py step, AdamW, global-norm clip 1.0, non-finite guard), every param trained
  jax   LoRA      - the same with lora.rank=8 lora.alpha=32 on q_proj, k_proj, v_proj (the HF Glm4 layout's
                    split of GLM-4's fused query_key_value, which THUDM's LoRA demo targets): only the adapter
                    is in the optimizer, the base frozen (the step still computes the base's gradients: see
                    the sanity note it prints)
  torch full SFT  - transformers Glm4ForCausalLM.from_pretrained(folder): forward (loss from labels=) +
                    backward + clip_grad_norm_(1.0) + torch.optim.AdamW
  torch LoRA      - peft.get_peft_model(that model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0, same
                    target_modules)); AdamW over the adapter's params alone
Hyper-parameters as train/configs/glm4_9b_chat_sft.yaml / glm4_9b_chat_lora.yaml (AdamW b2 0.999, eps 1e-8, no
weight decay, clip 1.0; lr 5e-5 full, 5e-4 LoRA), constant learning rate in both frameworks.

Data: the bundled example train/data/sft/glm4_chat.jsonl in format glm4_combine (as the SFT config), encoded
with the base's tokenizer and packed by glm-train's own SFT pipeline (glm_jax.data.sft read_jsonl / encode /
pack, several conversations to a row, the epochs in seeded orders) into [B, T] rows. The same batches go to
both frameworks: transformers gets input_ids, position_ids restarting per conversation, a 4-D block-diagonal
causal mask built from the segment ids (no token attends across conversations, as glm-jax's segment_ids) and
labels = -100 except where glm-jax's loss_mask is set (shifted back one place: transformers shifts them). The
loss in both is the mean token cross-entropy over the labelled tokens. glm-train projects only the labelled
positions to the vocabulary (loss_select, exact); transformers projects all of them.

Float32 on the CPU. torch.set_num_threads(--threads, default 2); XLA with its default threads (this host has 2
cores). torch's OpenMP wait policy is PASSIVE unless OMP_WAIT_POLICY is set (on a host whose cores are busy with
other work, spinning OpenMP workers made a torch step of the tests' tiny base 35x slower: 2.2 s against 0.065 s).
The process keeps freed host memory for reuse, as glm-train does (host_heap=auto, glm_jax/hostmem.py), for both
frameworks alike. Warm-up: each row runs one step on batch 0 (jax: the compile; its loss and gradient norm are the
sanity lines below), then the other batches once, untimed (on this shared host the jax steps just after the compile
ran at times 2-3x slower, batch for batch the same work as later). Then --rounds rounds alternate the four rows,
each row running --steps steps per round on the same batches in the same order in both frameworks (jax: dispatched
back to back and waited for at the end, as glm-train's loop runs). Reported: per row the median over rounds of
steps/s and tokens/s (B*T positions per step, padding included), and the ratios glm-jax / torch for full SFT and
LoRA. Sanity lines (not a test): the first step's loss and pre-clip gradient norm in both frameworks, which start
from the same weights (LoRA: glm-jax's initial A copied into peft's lora_A; B is zero in both).

    .venv/bin/python bench/sft_bench.py [--batch 8] [--seq 256] [--rounds 3] [--steps 5] [--threads 2]
        [--hidden 256] [--layers 4] [--heads 8] [--kv-heads 2] [--head-dim 32] [--ffn 1024]
(--hidden 32 --layers 2 --heads 4 --kv-heads 2 --head-dim 8 --ffn 64: the tests' own tiny base.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# torch's OpenMP workers sleep while they wait instead of spinning: on a host whose cores are busy with other
# work, spinning workers make every parallel region wait for a descheduled thread (see the docstring).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / "train" / "data" / "sft" / "glm4_chat.jsonl"
FORMAT = "glm4_combine"  # train/configs/glm4_9b_chat_sft.yaml's data.format
TARGETS = ["q_proj", "k_proj", "v_proj"]  # GLM-4's query_key_value in the HF Glm4 layout
RANK, ALPHA = 8, 32
LR_FULL, LR_LORA = 5e-5, 5e-4


def build_base(folder, a) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.adapter_models import build_glm4_chat

    build_glm4_chat(
        folder,
        seed=0,
        hidden=a.hidden,
        layers=a.layers,
        heads=a.heads,
        kv_heads=a.kv_heads,
        head_dim=a.head_dim,
        ffn=a.ffn,
    )
    cfg_path = pathlib.Path(folder) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if a.seq > cfg["max_position_embeddings"]:  # the builder's 256; rope has no table, only the field
        cfg["max_position_embeddings"] = a.seq
        cfg_path.write_text(json.dumps(cfg, indent=2))


# ---------------------------------------------------------------- glm-jax
class JaxRow:
    """glm-train's Run (its jitted step, its state on its mesh, its SFT batches) on the base folder."""

    def __init__(self, base, out, a, lora: bool):
        from train.config import build
        from train.trainer import Run

        over = [
            f"model={base}",
            "objective=sft",
            f"data.format={FORMAT}",
            f"data.source={DATA}",
            f"seq_len={a.seq}",
            f"batch_size={a.batch}",
            "steps=1000000",
            f"learning_rate={LR_LORA if lora else LR_FULL}",
            "schedule=constant",
            "warmup_steps=0",
            "warmup_ratio=0",
            "adam_b1=0.9",
            "adam_b2=0.999",
            "adam_eps=1e-8",
            "weight_decay=0",
            "grad_clip=1.0",
            "dtype=float32",
            "param_dtype=float32",
            f"output_dir={out}",
            "progress=none",
        ]
        if lora:
            over += [f"lora.rank={RANK}", f"lora.alpha={ALPHA}", f"lora.targets=[{', '.join(TARGETS)}]"]
        self.run = Run(build(None, over))

    def batches(self, n: int) -> list:
        from train import data as data_lib

        return [data_lib.to_device_dict(next(self.run.data)) for _ in range(n)]

    def put(self, local: list) -> None:
        with self.run.ctx():
            self.dev = [self.run.device_batch(b) for b in local]

    def steps(self, idx: list) -> dict:
        """Runs the steps on batches idx, back to back; waits for the last; returns the last step's metrics."""
        import jax

        run = self.run
        with run.ctx():
            for i in idx:
                run.state, m = run.step_fn(run.state, self.dev[i])
        return {k: float(v) for k, v in jax.device_get(m).items()}

    def lora_a(self) -> dict:
        """{HF module name: initial A [r, in]} of the adapter (glm_jax.adapters' site order)."""
        import numpy as np

        from glm_jax import adapters

        tree = self.run.state["params"][adapters.RUN_KEY]
        tree = {k: {x: np.asarray(y) for x, y in v.items()} for k, v in tree.items()}
        return {m: ab["A"] for m, ab in adapters.from_run_tree(tree, self.run.adapter.sites).items()}

    def close(self):
        self.run.checkpointer.close()
        close = getattr(self.run.data, "close", None)
        if close:
            close()


# ---------------------------------------------------------------- transformers (+ peft)
def torch_batch(b: dict) -> dict:
    """glm-jax's packed SFT batch as transformers takes it (see the docstring)."""
    import numpy as np
    import torch

    seg = b["segment_ids"]
    T = seg.shape[1]
    causal = np.tril(np.ones((T, T), bool))
    mask = (seg[:, :, None] == seg[:, None, :]) & causal  # padding (segment 0) attends to padding: no empty row
    labels = np.full(seg.shape, -100, np.int64)
    keep = b["loss_mask"][:, :-1] > 0  # targets[t] is the label of position t + 1
    labels[:, 1:] = np.where(keep, b["targets"][:, :-1], -100)
    assert not (b["loss_mask"][:, -1] > 0).any()  # a conversation's last token never has a target
    return {
        "input_ids": torch.tensor(b["tokens"], dtype=torch.long),
        "position_ids": torch.tensor(b["position_ids"], dtype=torch.long),
        "attention_mask": torch.tensor(mask[:, None]),
        "labels": torch.tensor(labels),
    }


class TorchRow:
    def __init__(self, base, lora_a: dict | None):
        import numpy as np
        import torch
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        self.kind = type(model).__name__
        if lora_a is not None:
            import peft

            cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS)
            model = peft.get_peft_model(model, cfg)
            self.kind = f"peft {self.kind}"
            got = 0
            with torch.no_grad():  # glm-jax's initial A: the same adapter start (B is zero in both)
                for name, p in model.named_parameters():
                    if ".lora_A." in name:
                        module = name.split("base_model.model.", 1)[1].split(".lora_A.")[0]
                        p.copy_(torch.from_numpy(np.array(lora_a[module])))
                        got += 1
            assert got == len(lora_a), (got, len(lora_a))
        self.model = model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        lr = LR_LORA if lora_a is not None else LR_FULL
        self.opt = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def put(self, local: list) -> None:
        self.dev = [torch_batch(b) for b in local]

    def steps(self, idx: list) -> dict:
        import torch

        for i in idx:
            loss = self.model(**self.dev[i]).loss
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return {"loss": float(loss.detach()), "grad_norm": float(norm)}


# ---------------------------------------------------------------- main


def warm_up(rows, steps: int, width: int = 44) -> dict:
    """Each row's step on batch 0 (jax: compiles), then on the other batches once, untimed; the first results."""
    first = {}
    for name, r in rows:
        t = time.perf_counter()
        first[name] = r.steps([0])
        t1 = time.perf_counter()
        r.steps(list(range(1, steps)))
        print(
            f"warm-up {name:{width}s} first step {t1 - t:5.1f}s, the other {steps - 1} batches "
            f"{time.perf_counter() - t1:5.1f}s",
            flush=True,
        )
    return first


def timed_rounds(rows, rounds: int, steps: int, tokens: int, width: int = 44) -> dict:
    """`rounds` rounds of `steps` steps per row, the rows alternating (the host is shared: load changes hit all of
    them alike); prints each round and the medians; returns {row name: median steps/s}."""
    rate = {name: [] for name, _ in rows}
    last = {}
    for k in range(rounds):
        for name, r in rows:
            t = time.perf_counter()
            last[name] = r.steps(list(range(steps)))
            rate[name].append(steps / (time.perf_counter() - t))
        print(f"round {k + 1}: " + ", ".join(f"{n.split(' (')[0]} {v[-1]:.2f}" for n, v in rate.items()) + " steps/s")
    med = {name: statistics.median(v) for name, v in rate.items()}
    print(f"\nmedian of {rounds} rounds x {steps} steps (steps/s per round in brackets):")
    for name, _ in rows:
        print(
            f"  {name:{width}s} {med[name]:7.3f} steps/s  {med[name] * tokens:9.0f} tokens/s  "
            f"[{', '.join(f'{x:.3f}' for x in rate[name])}]  last loss {last[name]['loss']:.4f}",
            flush=True,
        )
    return med


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="steps per row per round")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--ffn", type=int, default=1024)
    a = ap.parse_args()
    cmd = "$ .venv/bin/python bench/sft_bench.py " + " ".join(sys.argv[1:])
    print(cmd.rstrip(), flush=True)

    from glm_jax import hostmem

    kept = hostmem.apply("auto")  # as glm-train does, before either framework starts its threads
    import torch

    torch.set_num_threads(a.threads)
    import jax

    tmp = tempfile.TemporaryDirectory(prefix="sft_bench_")
    base = pathlib.Path(tmp.name) / "base"
    build_base(base, a)

    t = time.perf_counter()
    jfull = JaxRow(base, pathlib.Path(tmp.name) / "run_full", a, lora=False)
    jlora = JaxRow(base, pathlib.Path(tmp.name) / "run_lora", a, lora=True)
    local = jfull.batches(a.steps)  # the batches every row trains on, in this order, every round
    for r in (jfull, jlora):
        r.put(local)
    tfull = TorchRow(base, None)
    tlora = TorchRow(base, jlora.lora_a())
    for r in (tfull, tlora):
        r.put(local)
    t_setup = time.perf_counter() - t

    rows = [
        ("jax   full SFT (glm-train step)", jfull),
        ("jax   LoRA r8 (glm-train step)", jlora),
        (f"torch full SFT ({tfull.kind})", tfull),
        (f"torch LoRA r8 ({tlora.kind})", tlora),
    ]
    B, T = a.batch, a.seq
    labelled = sum(int(b["loss_mask"].sum()) for b in local) / len(local)
    real = sum(int((b["segment_ids"] > 0).sum()) for b in local) / len(local)
    n_full = sum(p.numel() for p in tfull.params)
    n_lora = sum(p.numel() for p in tlora.params)
    print(
        f"base {tfull.kind}: hidden {a.hidden}, {a.layers} layers, {a.heads} heads ({a.kv_heads} kv) x "
        f"{a.head_dim}, ffn {a.ffn}, vocab {tfull.model.config.vocab_size}: {n_full / 1e6:.2f}M params; LoRA r "
        f"{RANK} alpha {ALPHA} on {', '.join(TARGETS)}: {n_lora:,} trained params"
    )
    print(
        f"data {DATA.relative_to(ROOT)} ({FORMAT}), packed: batch {B} x seq {T} = {B * T} positions/step, "
        f"{real:.0f} real tokens, {labelled:.0f} labelled (mean over the {len(local)} batches)"
    )
    print(
        f"float32, CPU: jax {jax.__version__} ({jax.device_count()} device, XLA default threads), torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads, OMP_WAIT_POLICY {os.environ['OMP_WAIT_POLICY']}), "
        "transformers "
        f"{__import__('transformers').__version__}, peft {__import__('peft').__version__}, {os.cpu_count()} "
        f"cores; freed host memory {'kept for reuse' if kept else 'returned to the system'}; setup {t_setup:.1f}s",
        flush=True,
    )

    first = warm_up(rows, a.steps)
    (jf, jl, tf, tl) = (first[n] for n, _ in rows)
    print(
        f"sanity (same weights, same batch 0): full SFT loss jax {jf['loss']:.6f} torch {tf['loss']:.6f} "
        f"|diff| {abs(jf['loss'] - tf['loss']):.2e}, grad norm jax {jf['grad_norm']:.6f} torch "
        f"{tf['grad_norm']:.6f} |diff| {abs(jf['grad_norm'] - tf['grad_norm']):.2e}"
    )
    print(
        f"sanity (same adapter start): LoRA loss jax {jl['loss']:.6f} torch {tl['loss']:.6f} "
        f"|diff| {abs(jl['loss'] - tl['loss']):.2e}, grad norm jax {jl['grad_norm']:.6f} torch "
        f"{tl['grad_norm']:.6f} |diff| {abs(jl['grad_norm'] - tl['grad_norm']):.2e}; "
        f"sqrt(full SFT norm^2 + torch LoRA norm^2) = {math.hypot(jf['grad_norm'], tl['grad_norm']):.6f}",
        flush=True,
    )
    if abs(jl["grad_norm"] - tl["grad_norm"]) > 1e-3 * tl["grad_norm"]:
        print("  note: the LoRA gradient norms differ: is the frozen base's gradient counted in glm-train's step?")

    med = timed_rounds(rows, a.rounds, a.steps, B * T)
    (nf, nl, tfn, tln) = (n for n, _ in rows)
    print(
        f"glm-jax / torch (steps/s, median): full SFT {med[nf] / med[tfn]:.2f}x, LoRA {med[nl] / med[tln]:.2f}x; "
        f"LoRA / full: jax {med[nl] / med[nf]:.2f}x, torch {med[tln] / med[tfn]:.2f}x"
    )
    for r in (jfull, jlora):
        r.close()
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
