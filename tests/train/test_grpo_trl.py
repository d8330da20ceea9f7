"""One GRPO update of glm-train (train/rl/grpo.py: the log-probs of a jitted forward, train.rl.grpo_loss, and
their gradient) against TRL 1.16's GRPOTrainer._compute_loss on the same tiny transformers Glm4ForCausalLM and
the same FIXED completions (so that sampling does not enter): the loss and every parameter gradient to 1e-4.

The torch gradients come back into glm-jax's layout through glm_jax.checkpoint.hf.load_params (a linear map:
transposes, head reshapes), from a safetensors file written under the model's own parameter names."""

import json

import numpy as np
import pytest
from helpers.adapter_models import build_glm4_chat

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")


def _trl_trainer(model, out, loss_type, beta, G, max_new):
    import datasets
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    # TRL wants a processing class; _compute_loss never tokenizes, so a one-word vocabulary serves
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0}, "<pad>")))
    tok.pad_token = "<pad>"
    args = trl.GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=4,
        num_generations=G,
        max_completion_length=max_new,
        beta=beta,
        loss_type=loss_type,
        temperature=0.7,
        report_to=[],
        use_cpu=True,
        bf16=False,
    )
    data = datasets.Dataset.from_list([{"prompt": "x"}] * 4)
    return trl.GRPOTrainer(
        model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
        train_dataset=data, processing_class=tok,
    )  # fmt: skip


@pytest.mark.parametrize(("loss_type", "beta"), [("grpo", 0.04), ("dapo", 0.0), ("bnpo", 0.1), ("dr_grpo", 0.04)])
def test_grpo_update_equals_trl(tmp_path, loss_type, beta):
    import jax
    import jax.numpy as jnp
    from safetensors.torch import save_file

    from glm_jax.checkpoint.hf import load_params
    from train.config import build
    from train.rl.grpo import GRPO, GRPORun, completion_mask

    model_dir = tmp_path / "model"
    build_glm4_chat(model_dir, seed=3)
    import transformers

    # from the folder: TRL builds its reference model from the policy's name_or_path
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompts = [{"prompt": "what is 2+3?", "answer": "5"}, {"prompt": "what is 4+1?", "answer": "5"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    G, max_new = 2, 6
    tc = build(
        None,
        [
            f"model={model_dir}", "objective=grpo", f"data.source={tmp_path / 'p.jsonl'}", "batch_size=4",
            f"grpo.num_generations={G}", f"grpo.max_new_tokens={max_new}", f"grpo.beta={beta}",
            f"grpo.loss_type={loss_type}", "grpo.temperature=0.7", "grpo.rewards=[exact_answer]", "seq_len=64",
            f"output_dir={tmp_path / 'run'}", "progress=none", "grad_clip=0",
        ],
    )  # fmt: skip
    run = GRPORun(tc)
    grpo = GRPO(run)
    ids = [run.data.ids[0], run.data.ids[0], run.data.ids[1], run.data.ids[1]]
    assert len({len(x) for x in ids}) == 1  # no left padding: transformers' default positions are 0..T-1 then
    prompt = np.asarray(ids, np.int32)
    rng = np.random.default_rng(0)
    comp = rng.integers(0, 1000, size=(4, max_new)).astype(np.int32)
    eos = int(run.data.tokenizer.stop_token_ids[0])
    comp[0, 3], comp[1, 5], comp[2, 1] = eos, eos, eos  # rows end early, at the last token, right away; one never
    pad = int(run.data.tokenizer.pad_token_id)
    comp[0, 4:], comp[2, 2:] = pad, pad
    mask = np.asarray(completion_mask(jnp.asarray(comp), grpo.eos))
    adv = np.array([0.7, -0.7, 1.3, -0.2], np.float32)

    # glm-train: the update's loss function, differentiated
    b = {"seq": np.concatenate([prompt, comp], 1), "real": np.ones((4, prompt.shape[1] + max_new), np.int32)}
    b.update(mask=mask, adv=adv)
    b = {k: jnp.asarray(v) for k, v in b.items()}
    params = run.state["params"]
    with run.ctx():
        if beta:
            b["ref_logp"] = grpo.ref_fn(grpo.ref_params, b["seq"], b["real"])
        (loss, _), grads = jax.value_and_grad(grpo.loss_fn, has_aux=True)(params, b)

    # TRL: the same model, completions and advantages; the reference is the model itself (its start)
    trainer = _trl_trainer(hf, tmp_path / "trl", loss_type, beta, G, max_new)
    hf.eval()  # mode "eval": no gradient-accumulation normaliser (one step, one microbatch)
    inputs = {
        "prompt_ids": torch.tensor(prompt, dtype=torch.long),
        "prompt_mask": torch.ones(prompt.shape, dtype=torch.long),
        "completion_ids": torch.tensor(comp, dtype=torch.long),
        "completion_mask": torch.tensor(mask, dtype=torch.long),
        "advantages": torch.tensor(adv),
        "num_items_in_batch": torch.tensor(float(mask.sum())),
    }
    if beta:
        with torch.no_grad():
            ref = trainer._get_per_token_logps_and_entropies(
                trainer.ref_model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
                torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), max_new,
            )[0]  # fmt: skip
        inputs["ref_per_token_logps"] = ref
    hf.zero_grad()
    ref_loss = trainer._compute_loss(hf, inputs)
    ref_loss.backward()
    np.testing.assert_allclose(float(loss), ref_loss.item(), rtol=1e-4, atol=1e-6)

    # torch's gradients in glm-jax's layout, then every leaf compared
    gdir = tmp_path / "grads"
    gdir.mkdir()
    (gdir / "config.json").write_text((model_dir / "config.json").read_text())
    save_file({n: p.grad.detach().contiguous() for n, p in hf.named_parameters()}, str(gdir / "model.safetensors"))
    want = load_params(run.cfg, gdir)
    got = jax.device_get(grads)
    flat_w, flat_g = jax.tree_util.tree_flatten_with_path(want)[0], dict(jax.tree_util.tree_flatten_with_path(got)[0])
    assert len(flat_w) == len(flat_g)
    scale = max(float(np.max(np.abs(v))) for _, v in flat_w)
    for path, w in flat_w:
        g = np.asarray(flat_g[path])
        np.testing.assert_allclose(g, np.asarray(w), rtol=1e-4, atol=1e-4 * scale, err_msg=jax.tree_util.keystr(path))
