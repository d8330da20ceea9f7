"""glm-train LoRA end to end (DESIGN §3.6): a tiny transformers Glm4 chat base written here, LoRA for a few SFT steps
on the bundled example data (scan_layers, on a data x fsdp x tensor mesh), then: the base params bit-identical,
the adapter trained, the PEFT folder that `glm-convert to-torch RUN E --adapter` writes loaded by peft onto the
untouched transformers base gives glm-jax's logits of the run to 1e-4, the merged export does too in transformers,
and a resumed run goes on from the saved adapter."""

import json

import numpy as np
import pytest
from helpers import SFT_EXAMPLES as EXAMPLES
from helpers.adapter_models import build_glm4_chat
from helpers.train_runs import CACHE, metrics

import glm_jax
from convert.cli import main as convert_main
from glm_jax import adapters
from glm_jax.checkpoint.orbax import OrbaxStore, open_jax

IDS = np.array([[1002, 1004, 1007, 198, 413, 442, 1008, 198, 39, 72, 565, 17, 300, 5]])


def _train(base, run, steps, extra=()):
    from train.config import build
    from train.trainer import train

    tc = build(
        None,
        [
            f"model={base}",
            "objective=sft",
            "data.format=glm4",
            f"data.source={EXAMPLES / 'glm4_chat.jsonl'}",
            "seq_len=128",
            "batch_size=4",
            f"steps={steps}",
            "log_every=1",
            "checkpoint_every=3",
            "learning_rate=3e-2",
            "warmup_steps=1",
            "lora.rank=4",
            "lora.alpha=8",
            "lora.targets=[q_proj, v_proj, gate_up_proj]",
            "scan_layers=true",
            "mesh.data=2",
            "mesh.fsdp=2",
            "mesh.tensor=2",
            f"output_dir={run}",
            "progress=none",
            f"compilation_cache_dir={CACHE}",
            *extra,
        ],
    )
    return train(tc)


def _raw_params(run) -> dict:
    """Every leaf the run's latest step stores, as saved (the adapter's own leaves under lora/)."""
    ck = open_jax(run)
    store = ck.store.base if isinstance(ck.store, adapters.MergedStore) else ck.store
    assert isinstance(store, OrbaxStore)
    return {p: np.asarray(store.read(p)) for p in store.paths()}


def test_lora_run_exports_to_peft_and_transformers(tmp_path):
    import peft
    import torch
    import transformers
    from flax import traverse_util

    base = tmp_path / "base"
    model = build_glm4_chat(base, seed=3)
    run = tmp_path / "run"
    _train(base, run, steps=3)

    # base params bit-identical (stacked, as the scan_layers run holds them), the adapter trained
    saved = _raw_params(run)
    ref = traverse_util.flatten_dict(glm_jax.from_pretrained(base, scan_layers=True).params, sep="/")
    lora = {p: a for p, a in saved.items() if p.startswith("lora/")}
    assert set(saved) - set(lora) == set(ref)
    for p, a in ref.items():
        np.testing.assert_array_equal(saved[p], np.asarray(a), err_msg=p)
    assert len(lora) == 2 * 2 * 3  # 2 layers x (q_proj, v_proj, gate_up_proj) x (A, B)
    assert all(np.abs(a).max() > 1e-4 for p, a in lora.items() if p.endswith("/B"))  # B starts at zero
    m = metrics(run)
    assert [r["step"] for r in m] == [1, 2, 3] and m[-1]["loss"] < m[0]["loss"]

    # the run is a LoRA checkpoint folder: the PEFT files beside config.json, from_pretrained merges the adapter
    cfg = json.loads((run / adapters.ADAPTER_CONFIG).read_text())
    assert (
        cfg["r"] == 4
        and cfg["lora_alpha"] == 8
        and sorted(cfg["target_modules"]) == ["gate_up_proj", "q_proj", "v_proj"]
    )
    ours = np.asarray(glm_jax.from_pretrained(run)(IDS))
    plain = np.asarray(glm_jax.from_pretrained(base)(IDS))
    assert np.abs(ours - plain).max() > 1e-3  # the adapter changes the logits

    # glm-convert to-torch RUN E --adapter: a PEFT folder that peft loads onto the untouched transformers base
    exp = tmp_path / "adapter"
    assert convert_main(["to-torch", str(run), str(exp), "--adapter"]) == 0
    assert (exp / adapters.ADAPTER_WEIGHTS).is_file() and (exp / "tokenizer.model").is_file()
    pm = peft.PeftModel.from_pretrained(model, exp).eval()
    assert sum("lora_A" in k for k, _ in pm.named_parameters()) == 6
    with torch.no_grad():
        theirs = pm(torch.tensor(IDS)).logits.numpy()
    assert np.abs(ours - theirs).max() < 1e-4
    # the same adapter through apply_lora (the training path) on the base
    lm = glm_jax.from_pretrained(base)
    sites = adapters.lora_sites(lm.config, ["q_proj", "v_proj", "gate_up_proj"])
    _, ab = adapters.read_peft_adapter(exp, sites)
    eff = adapters.apply_lora(lm.params, ab, sites, 8 / 4)
    assert np.abs(np.asarray(lm.module.apply({"params": eff}, IDS)) - theirs).max() < 1e-4

    # without --adapter: merged full weights that transformers loads
    merged = tmp_path / "merged"
    assert convert_main(["to-torch", str(run), str(merged)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        got = hf(torch.tensor(IDS)).logits.numpy()
    assert np.abs(got - ours).max() < 1e-4

    # resume: the saved adapter and optimizer state go on; the base still bit-identical
    _train(base, run, steps=5)
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5]
    again = _raw_params(run)
    for p, a in ref.items():
        np.testing.assert_array_equal(again[p], np.asarray(a), err_msg=p)
    assert any(np.abs(again[p] - lora[p]).max() > 0 for p in lora)
    # a resume with other adapter settings is refused (bad input), before anything is restored
    from train.config import TrainConfigError

    with pytest.raises(TrainConfigError, match="adapter saved"):
        _train(base, run, steps=6, extra=["lora.rank=2"])


@pytest.mark.parametrize("kind", ["lora", "ptuning"])
def test_optimizer_state_holds_only_the_adapter(tmp_path, kind):
    """Adam's two moments exist for the adapter's params alone (plus the step counter): the base has none."""
    import math

    import jax

    from train import parallel
    from train.config import build
    from train.trainer import model_config, state_layout

    if kind == "lora":
        base = tmp_path / "base"
        build_glm4_chat(base, layers=1)
        over = [f"model={base}", "lora.r=4", "lora.target_modules=[q_proj, down_proj]", "scan_layers=true"]
    else:  # P-Tuning needs a ChatGLM2-family base: the preset at its shapes only (nothing is allocated)
        over = ["model=chatglm3_6b", "ptuning.pre_seq_len=128", "scan_layers=true"]
    tc = build(None, over)
    cfg, _ = model_config(tc)
    lay = state_layout(tc, cfg, parallel.build_mesh(tc.mesh))
    trained = lay["abstract"]["params"]["lora" if kind == "lora" else "prefix_encoder"]
    n_trained = sum(math.prod(x.shape) for x in jax.tree.leaves(trained))
    n_opt = sum(math.prod(x.shape) for x in jax.tree.leaves(lay["abstract"]["opt_state"]))
    assert n_opt == 2 * n_trained + 1
    if kind == "ptuning":  # THUDM's demo: 128 x (28 layers x 2 x 2 groups x 128)
        assert n_trained == 128 * 28 * 2 * 2 * 128
