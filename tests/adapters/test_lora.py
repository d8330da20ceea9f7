"""LoRA (glm_jax/adapters.py) against peft: adapters on the base checkpoint's own module names, fused ones included,
written as a PEFT folder that peft loads onto the untouched transformers base; logits to 1e-4."""

import jax
import numpy as np
import pytest
from helpers import FIX
from helpers.adapter_models import build_glm4_chat

import glm_jax
from glm_jax import adapters

IDS = np.array([[1002, 1004, 1007, 198, 413, 442, 1008, 198, 39, 72, 565, 17, 300, 5]])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora_base")
    model = build_glm4_chat(folder, seed=1)
    return folder, model


def _random_lora(sites, rank, seed):
    rng = np.random.default_rng(seed)
    return {
        s.module: {
            "A": rng.normal(0, 0.3, (rank, s.in_features)).astype(np.float32),
            "B": rng.normal(0, 0.3, (s.out_features, rank)).astype(np.float32),
        }
        for s in sites
    }


@pytest.mark.parametrize(
    "targets", [["q_proj", "v_proj"], ["gate_up_proj", "o_proj"], "all-linear"], ids=["qv", "fused", "all"]
)
def test_peft_loads_our_adapter_and_agrees(base, tmp_path, targets):
    import peft
    import torch

    folder, model = base
    lm = glm_jax.from_pretrained(folder)
    rank, alpha = 4, 8
    sites = adapters.lora_sites(lm.config, targets)
    names = {s.module.rsplit(".", 1)[-1] for s in sites}
    if targets == "all-linear":
        assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"}
    lora = _random_lora(sites, rank, seed=len(sites))
    adapters.write_peft_adapter(tmp_path / "A", lora, sites, rank, alpha, base_name=str(folder))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm = peft.PeftModel.from_pretrained(model, tmp_path / "A").eval()
    n_lora = sum("lora_A" in k for k, _ in pm.named_parameters())
    assert n_lora == len(sites)
    with torch.no_grad():
        ref = pm(torch.tensor(IDS)).logits.numpy()
    eff = adapters.apply_lora(lm.params, jax.tree.map(np.asarray, lora), sites, alpha / rank)
    got = np.asarray(lm.module.apply({"params": eff}, IDS))
    assert np.abs(got - ref).max() < 1e-4
    assert np.abs(got - np.asarray(lm(IDS))).max() > 1e-2  # the adapter changes the logits
    # merged weights give the same logits; unmerging gives back the base (to float32 rounding)
    merged = adapters.merge_lora(jax.tree.map(np.asarray, lm.params), lora, sites, alpha / rank)
    assert np.abs(np.asarray(lm.module.apply({"params": merged}, IDS)) - ref).max() < 1e-4
    back = adapters.merge_lora(merged, lora, sites, alpha / rank, sign=-1.0)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(lm.params)):
        np.testing.assert_allclose(a, np.asarray(b), atol=1e-5)
    # peft's merge_and_unload (transformers weights) against ours
    with torch.no_grad():
        m2 = pm.merge_and_unload()
        ref2 = m2(torch.tensor(IDS)).logits.numpy()
    assert np.abs(ref2 - ref).max() < 1e-4
    for k, v in before.items():  # restore the shared base for the next case
        m2.state_dict()[k].copy_(v)


def test_unknown_target_names_the_layout(base):
    lm = glm_jax.from_pretrained(base[0])
    with pytest.raises(ValueError, match="query_key_value.*q_proj"):
        adapters.lora_sites(lm.config, ["query_key_value"])


def _module_tree(keys_shapes):
    """A torch module tree with an nn.Linear (no bias) for every 2-D '.weight' of a checkpoint's key list (an
    nn.Embedding for the word table)."""
    import torch

    root = torch.nn.Module()
    for key, shape in keys_shapes:
        if not key.endswith(".weight") or len(shape) != 2:
            continue
        *parents, name, _ = key.split(".")
        node = root
        for p in parents:
            if not hasattr(node, p):
                node.add_module(p, torch.nn.Module())
            node = getattr(node, p)
        if "embedding" in name:  # the word table is an nn.Embedding in the reference model, not a linear
            node.add_module(name, torch.nn.Embedding(shape[0], shape[1]))
        else:
            node.add_module(name, torch.nn.Linear(shape[1], shape[0], bias=False))
    return root


@pytest.mark.parametrize("targets", [["query_key_value"], ["query_key_value", "dense_h_to_4h"], "all-linear"])
def test_chatglm2_layout_keys_match_peft(tmp_path, targets):
    """PEFT on a module tree built from the chatglm2 fixture's own key names: the state-dict keys it saves for
    LoRA on query_key_value (fused [Q|K|V]) are the keys we write, with the same shapes."""
    import peft
    from safetensors.numpy import load_file

    from glm_jax.checkpoint.hf import open_weights

    folder = FIX / "chatglm2-6b" / "model"
    lm = glm_jax.from_pretrained(folder)
    _, readers = open_weights(folder)
    keys_shapes = [(k, tuple(r.shape(k))) for k, r in readers.items()]
    tree = _module_tree(keys_shapes)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets if targets != "all-linear" else "all-linear")
    pm = peft.get_peft_model(tree, cfg)
    theirs = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(pm).items()}
    sites = adapters.lora_sites(lm.config, targets)
    adapters.write_peft_adapter(tmp_path, _random_lora(sites, 2, 0), sites, 2, 4)
    ours = {k: tuple(v.shape) for k, v in load_file(str(tmp_path / adapters.ADAPTER_WEIGHTS)).items()}
    if targets == "all-linear":  # peft leaves out the output layer by its name only on a model with a config:
        theirs = {k: s for k, s in theirs.items() if ".output_layer." not in k}
    assert ours == theirs
