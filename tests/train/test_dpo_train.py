"""glm-train objective=dpo (train/rl/dpo.py, DESIGN §3.12) against TRL 1.16's DPOTrainer.

- One step's loss, rewards and every gradient equal DPOTrainer.compute_loss + torch autograd on the same
  transformers model, reference model and pairs (TRL's own DataCollatorForPreference lays out its batch), for
  sigmoid, ipo and hinge; with a LoRA adapter, TRL's reference is the peft model with the adapter disabled.
- A real glm-train run's step-1 loss is log 2 (sigmoid) and 1/(4 beta^2) (ipo): policy = reference at step 1.
- On the bundled toy preference set (train/data/dpo_arith.jsonl: "What is a+b?" for a, b in 1..5, the right sum
  chosen, a wrong one rejected, three wrong ones a prompt), rewards/accuracy reaches >= 0.9 (the mean of the last
  10 of 60 steps) within a CPU-minutes run.
"""

import math
import pathlib

import jax
import numpy as np
import pytest
from helpers.adapter_models import build_glm4_chat
from helpers.train_runs import CACHE, metrics, train

torch = pytest.importorskip("torch")
dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")

ROOT = pathlib.Path(__file__).resolve().parents[2]
ARITH = ROOT / "train" / "data" / "dpo_arith.jsonl"
PAIRS, T, BETA = 4, 32, 0.1


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo_models")
    pol = build_glm4_chat(d / "policy", seed=0)
    ref = build_glm4_chat(d / "ref", seed=1)  # a reference unlike the policy: non-zero log-ratios
    return d / "policy", pol, d / "ref", ref


def _trl(policy, ref_model, loss_type, tmp, peft_config=None):
    """A DPOTrainer on the torch models (its dataset is a placeholder: compute_loss gets our collated batch)."""
    import datasets
    import tokenizers
    import transformers
    from trl import DPOConfig, DPOTrainer

    word = tokenizers.models.WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>")
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(word), pad_token="<pad>", eos_token="<unk>"
    )
    args = DPOConfig(
        output_dir=str(tmp), beta=BETA, loss_type=[loss_type], report_to=[], use_cpu=True, bf16=False, fp16=False
    )
    ds = datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    return DPOTrainer(
        model=policy, ref_model=ref_model, args=args, processing_class=tok, train_dataset=ds, peft_config=peft_config
    )


def _pairs_and_batch(folder):
    """The first PAIRS records of the toy set as glm-train's batch, and as TRL's collated inputs."""
    from glm_jax import load_tokenizer
    from train.rl.dpo_data import PreferenceBatches

    data = PreferenceBatches(str(ARITH), load_tokenizer(folder), T, PAIRS, seed=0)
    data.pairs = data.pairs[:PAIRS]
    data._order = lambda epoch: np.arange(PAIRS)
    batch = next(data)
    examples = [
        {"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids} for p in data.pairs
    ]
    assert all(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= T for p in data.pairs)
    assert all(set(p.chosen_mask) == {1} and set(p.rejected_mask) == {1} for p in data.pairs)  # TRL: all ones
    return batch, dpo_trainer.DataCollatorForPreference(pad_token_id=0)(examples)


def _torch_grads(model):
    return {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}


def _by_hf_key(cfg, tree):
    from glm_jax import families

    def at(t, path):
        for part in path.split("/"):
            t = t[part]
        return t

    out = {}
    for r in families.keymap(cfg):
        arrays = [np.asarray(jax.device_get(at(tree, p))) for p in r.jax]
        out.update(zip(r.hf, r.save(cfg, arrays)))
    return out


def _tc(loss_type, *keys):
    from train.config import build

    return build(None, ["objective=dpo", f"dpo.loss={loss_type}", f"dpo.beta={BETA}", f"batch_size={PAIRS}", *keys])


def _close(got, want, name):
    tol = 1e-4 * max(np.abs(want).max(), 1e-6)
    assert np.abs(got - want).max() <= tol, (name, np.abs(got - want).max(), np.abs(want).max())


@pytest.mark.parametrize(
    "loss_type,keys",
    [("sigmoid", []), ("ipo", []), ("hinge", []), ("sigmoid", ["loss_chunk=8", "grad_accum=2"])],
    ids=["sigmoid", "ipo", "hinge", "sigmoid-chunked-accum"],
)
def test_full_finetune_step_equals_trl(models, tmp_path, loss_type, keys):
    """keys: the logits in blocks of 8 positions and two microbatches of 2 pairs (TRL: one batch of 4)."""
    import glm_jax
    from train.rl import dpo

    pol_dir, pol, ref_dir, ref = models
    batch, inputs = _pairs_and_batch(pol_dir)
    pol.zero_grad()
    tr = _trl(pol, ref, loss_type, tmp_path)
    pol.train()  # dropout is 0: train mode only tells TRL which metrics to log
    loss = tr.compute_loss(pol, inputs)
    loss.backward()
    want = _torch_grads(pol)
    trl_metrics = {k: v[-1] for k, v in tr._metrics["train"].items()}

    lm, lm_ref = glm_jax.from_pretrained(pol_dir), glm_jax.from_pretrained(ref_dir)
    tc = _tc(loss_type, *keys)
    frozen = jax.tree.map(lambda _: False, lm.params)
    grads, sums = jax.jit(dpo.make_grad_fn(lm.module, tc, frozen))(lm.params, lm_ref.params, batch)
    assert abs(float(sums["loss"]) / PAIRS - loss.item()) <= 1e-4 * max(abs(loss.item()), 1.0)
    for ours, theirs in [
        ("chosen", "chosen"),
        ("rejected", "rejected"),
        ("margin", "margins"),
        ("accuracy", "accuracies"),
    ]:
        assert abs(float(sums[f"rewards/{ours}"]) / PAIRS - trl_metrics[f"rewards/{theirs}"]) <= 1e-4, ours
    assert abs(float(sums["rewards/margin"])) > 1e-2  # the reference differs: the log-ratios are not all zero
    got = _by_hf_key(lm.config, grads)
    assert set(got) == set(want)
    for k, w in want.items():
        _close(got[k], w, k)
    assert max(np.abs(w).max() for w in want.values()) > 1e-3  # the loss has a gradient here (hinge: margin < 1)


def test_lora_step_equals_trl_with_the_adapter_disabled(models, tmp_path):
    """TRL with a peft LoRA model and no ref_model takes the base with the adapter disabled as its reference;
    glm-train's LoRA run takes the run's params with the adapter zeroed (train/rl/dpo.py reference)."""
    import peft

    import glm_jax
    from glm_jax import adapters
    from train import adapters as train_adapters
    from train.adapters import LORA
    from train.rl import dpo

    pol_dir, _, _, _ = models
    base = build_glm4_chat(tmp_path / "base", seed=0)
    rank, alpha, targets = 4, 8, ["q_proj", "v_proj", "down_proj"]
    tc = _tc(
        "sigmoid", f"model={tmp_path / 'base'}", f"lora.rank={rank}", f"lora.alpha={alpha}", f"lora.targets={targets}"
    )
    lm = glm_jax.from_pretrained(tmp_path / "base")
    plan = train_adapters.plan(tc, lm.config)
    rng = np.random.default_rng(0)
    lora = {  # a trained adapter: B non-zero, so policy and reference differ
        s.module: {
            "A": rng.normal(0, 0.3, (rank, s.in_features)).astype(np.float32),
            "B": rng.normal(0, 0.3, (s.out_features, rank)).astype(np.float32),
        }
        for s in plan.sites
    }
    adapters.write_peft_adapter(tmp_path / "A", lora, plan.sites, rank, alpha, base_name=str(tmp_path / "base"))
    batch, inputs = _pairs_and_batch(pol_dir)
    # a new adapter (peft_config): TRL's reference is the model with it disabled; then it gets trained weights
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
    tr = _trl(base, None, "sigmoid", tmp_path / "out", peft_config=config)
    pm = tr.model
    assert "ref" not in pm.peft_config
    from safetensors.torch import load_file

    res = peft.set_peft_model_state_dict(pm, load_file(tmp_path / "A" / "adapter_model.safetensors"))
    assert not [k for k in res.unexpected_keys if "lora_" in k]
    pm.train()
    loss = tr.compute_loss(pm, inputs)
    loss.backward()
    want = {n: p.grad.numpy() for n, p in pm.named_parameters() if p.grad is not None}
    assert want and all("lora_" in n for n in want)

    params = {**lm.params, LORA: adapters.to_run_tree(jax.tree.map(np.asarray, lora), plan.sites)}
    frozen = {k: jax.tree.map(lambda _, f=(k != LORA): f, v) for k, v in params.items()}
    ref = dpo.reference_params({"params": params}, plan, plan.loss_params)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(lm.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the adapter off is the base itself
    grads, sums = jax.jit(dpo.make_grad_fn(lm.module, tc, frozen, params_fn=plan.loss_params))(params, ref, batch)
    assert abs(float(sums["loss"]) / PAIRS - loss.item()) <= 1e-4 * loss.item()
    assert abs(loss.item() - math.log(2)) > 1e-3  # the adapter moved the policy away from the reference
    got = adapters.from_run_tree(jax.device_get(grads[LORA]), plan.sites)
    for s in plan.sites:
        for part in ("A", "B"):
            name = next(n for n in want if f"{s.module}.lora_{part}." in n)
            _close(np.asarray(got[s.module][part]), want[name], name)


@pytest.mark.parametrize(
    "loss_type,extra",
    [("sigmoid", []), ("ipo", ["lora.rank=4", "lora.targets=[q_proj, v_proj]"])],
    ids=["sigmoid-full", "ipo-lora"],
)
def test_step_one_loss(models, tmp_path, loss_type, extra):
    pol_dir = models[0]
    out = tmp_path / "run"
    train(_run(out, pol_dir, f"dpo.loss={loss_type}", "steps=1", *extra))
    rec = metrics(out)[0]
    want = math.log(2) if loss_type == "sigmoid" else 1 / (4 * BETA**2)
    assert abs(rec["loss"] - want) <= 1e-6 * want
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
        assert rec[k] == 0.0, k  # the policy is the reference at step 1


def _run(out, model, *keys):
    from train.config import build

    return build(
        None,
        [
            f"output_dir={out}",
            "progress=none",
            f"compilation_cache_dir={CACHE}",
            f"model={model}",
            "objective=dpo",
            f"data.source={ARITH}",
            f"dpo.beta={BETA}",
            "batch_size=8",
            f"seq_len={T}",
            "log_every=1",
            "checkpoint_every=1000",
            *keys,
        ],
    )


def test_toy_preferences_are_learned(models, tmp_path):
    out = tmp_path / "run"
    keys = ["steps=60", "batch_size=16", "learning_rate=3e-3", "schedule=constant", "warmup_steps=2"]
    train(_run(out, models[0], *keys))
    recs = metrics(out)
    assert recs[0]["rewards/accuracy"] == 0.0  # step 1: policy = reference, no pair is told apart yet
    last = recs[-10:]
    assert np.mean([r["rewards/accuracy"] for r in last]) >= 0.9, [r["rewards/accuracy"] for r in recs]
    assert np.mean([r["rewards/margin"] for r in last]) > 0
    assert np.mean([r["loss"] for r in last]) < math.log(2)
