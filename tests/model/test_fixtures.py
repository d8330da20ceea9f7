"""Golden parity with the original PyTorch code, through the public API only (from_pretrained, lm(...), generate)."""

import numpy as np
import pytest
from helpers.fixture_models import MODEL_FIXTURES, TOL, folders, io, load, max_diff, reference_inputs

CASES = [(n, s) for n in MODEL_FIXTURES for s in folders(n)]


@pytest.mark.parametrize("name,sub", CASES)
def test_logits_match_reference(name, sub):
    d = io(name)
    kw, real = reference_inputs(name, d)
    logits = load(name, sub)(d["input_ids"], **kw)
    assert logits.dtype == np.float32 and logits.shape == d["logits"].shape
    assert max_diff(logits, d["logits"], real) <= TOL.get(name, 1e-4)


@pytest.mark.parametrize("name", [n for n in MODEL_FIXTURES if n != "glm-original"])
def test_hidden_states_match_reference(name):
    d = io(name)
    kw, real = reference_inputs(name, d)
    lm = load(name)
    _, hid = lm.module.apply({"params": lm.params}, d["input_ids"], method="with_hidden", **kw)
    ref = d["hidden_states"]
    L = lm.config.num_layers
    tol = TOL.get(name, 1e-4)
    for i in range(L):  # entry i < L is the input of layer i in every family
        assert max_diff(hid.layer_inputs[i], ref[i], real) <= tol, i
    # the last entry: after the final norm for ChatGLM-6B and Glm/Glm4/Glm4Moe, before it for ChatGLM2/3 and GLM-4
    # remote
    after_norm = ("chatglm-6b", "transformers-glm", "transformers-glm4", "transformers-glm4-moe")
    last = hid.final if name in after_norm else hid.last
    assert max_diff(last, ref[L], real) <= tol
    if "last_hidden_state" in d:
        assert max_diff(hid.final, d["last_hidden_state"], real) <= tol


@pytest.mark.parametrize("name,sub", [c for c in CASES if c[0] != "glm-original"])
def test_greedy_generation_matches_reference(name, sub):
    d = io(name)
    _, real = reference_inputs(name, d)
    new = d["generated_ids"].shape[1] - d["input_ids"].shape[1]
    out, scores = load(name, sub).generate(
        d["input_ids"], attention_mask=real.astype(np.int32), max_new_tokens=new, return_logits=True
    )
    np.testing.assert_array_equal(out, d["generated_ids"])
    if "generation_step_logits" in d:  # KV-cache step logits equal the reference's cached steps
        assert np.abs(scores - d["generation_step_logits"]).max() <= TOL.get(name, 1e-4)


@pytest.mark.parametrize(
    "name",
    [
        "chatglm2-6b",
        "chatglm3-6b-32k",
        "glm-4-9b-chat-remote",
        "transformers-glm",
        "transformers-glm4",
        "chatglm2-6b-ptuning-v2",
    ],
)
def test_default_positions_from_padding_mask(name):
    """With a padding mask and no position_ids, positions count the real tokens from 0 (the tokenizer's rule)."""
    d = io(name)
    _, real = reference_inputs(name, d)
    logits = load(name)(d["input_ids"], attention_mask=d["attention_mask"])
    assert max_diff(logits, d["logits"], real) <= 1e-4


@pytest.mark.parametrize("name", ["transformers-glm", "transformers-glm4"])
def test_explicit_arange_positions(name):
    d = io(name)
    _, real = reference_inputs(name, d)
    pos = np.broadcast_to(np.arange(d["input_ids"].shape[1]), d["input_ids"].shape)
    logits = load(name)(d["input_ids"], attention_mask=d["attention_mask"], position_ids=pos)
    assert max_diff(logits, d["logits_without_position_ids"], real) <= 1e-4


def test_chatglm6b_default_masks_and_positions():
    """No mask: the model's own rule (pads count as context). A padding mask: the tokenizer's rule."""
    from glm_jax.model.masks import default_allowed, default_positions

    d = io("chatglm-6b")
    cfg = load("chatglm-6b").config
    ids = d["input_ids"]
    np.testing.assert_array_equal(np.asarray(default_positions(cfg, ids)), d["model_built_position_ids"])
    np.testing.assert_array_equal(np.asarray(default_allowed(cfg, ids)), ~d["model_built_attention_mask"][:, 0])
    pad = (ids != 3).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(default_positions(cfg, ids, pad)), d["position_ids"])
    real = pad.astype(bool)
    allowed = np.asarray(default_allowed(cfg, ids, pad))
    ref = ~d["attention_mask"][:, 0]
    np.testing.assert_array_equal(allowed[real], ref[real])  # padded query rows are implementation-defined
    logits = load("chatglm-6b")(ids, attention_mask=pad)
    assert max_diff(logits, d["logits"], real) <= 5e-4


def test_glm_original_variants():
    import glm_jax

    d = io("glm-original")
    real = d["input_ids"] != 0
    lm = load("glm-original")
    dense = lm(d["input_ids"], attention_mask=d["attention_mask_dense"], position_ids=d["position_ids"])
    assert max_diff(dense, d["logits"], real) <= 1e-4
    # the generation batch: dense mask from the reference tokenizer's build_inputs_for_generation
    g = lm(d["gen_input_ids"], attention_mask=d["gen_attention_mask"], position_ids=d["gen_position_ids"])
    greal = np.ones(d["gen_input_ids"].shape, bool)
    greal[:, :7] = d["gen_context_padding_mask"].astype(bool)
    assert max_diff(g, d["gen_logits"], greal) <= 1e-4
    # Megatron's tanh GELU
    tanh = glm_jax.from_pretrained(lm_path("glm-original"), mlp="gelu_tanh")
    out = tanh(d["input_ids"], position_ids=d["position_ids"], prefix_len=d["sep"])
    assert max_diff(out, d["logits_megatron_tanh_gelu"], real) <= 1e-4
    assert max_diff(out, d["logits"], real) > 1e-3  # the two GELUs are distinguishable here


def test_glm_original_default_positions_and_loss():
    """With the special ids known, positions and the sep rule come from the tokens alone; loss as the spec."""
    import jax
    import optax

    import glm_jax

    d = io("glm-original")
    lm = glm_jax.from_pretrained(
        lm_path("glm-original"), bos_token_id=6, mask_token_id=3, smask_token_id=4, gmask_token_id=5
    )
    real = d["input_ids"] != 0
    mask = real.astype(np.int32)
    from glm_jax.model.masks import default_positions

    pos = np.asarray(default_positions(lm.config, d["input_ids"], mask, d["sep"]))
    np.testing.assert_array_equal(pos[:, 0][real], d["position_ids"][:, 0][real])
    np.testing.assert_array_equal(pos[:, 1][real], d["position_ids"][:, 1][real])
    logits = lm(d["input_ids"])  # sep found at the first <sop>, positions by the layout rule
    assert max_diff(logits, d["logits"], real) <= 1e-4
    # the HF generation batch (right-padded context + sop + 3 tokens): padding mask only, the rest by the rule
    gmask = np.ones(d["gen_input_ids"].shape, np.int32)
    gmask[:, :7] = d["gen_context_padding_mask"]
    g = lm(d["gen_input_ids"], attention_mask=gmask, prefix_len=[7, 7])
    assert max_diff(g, d["gen_logits"], gmask.astype(bool)) <= 1e-4
    # greedy generation from the context + <sop>: each step equals the full forward's argmax at that point
    ctx = d["gen_input_ids"][:, :8]
    out, steps = lm.generate(ctx, attention_mask=gmask[:, :8], max_new_tokens=3, eos_token_id=[-1], return_logits=True)
    full = lm(out, attention_mask=np.concatenate([gmask[:, :8], np.ones((2, 3), np.int32)], 1), prefix_len=[7, 7])
    assert np.abs(np.asarray(full)[:, 7:10] - steps).max() <= 1e-4
    np.testing.assert_array_equal(out[:, 8:], np.argmax(steps, -1))
    labels = np.where(d["labels"] < 0, 0, d["labels"])
    ce = optax.softmax_cross_entropy_with_integer_labels(jax.numpy.asarray(logits), labels)
    loss = float((ce * d["loss_mask"]).sum() / d["loss_mask"].sum())
    assert abs(loss - float(d["pretrain_loss"])) <= 1e-4


@pytest.mark.parametrize("per_layer", [True, False])
def test_glm_original_incremental_decoding(per_layer):
    """KV-cached decoding of row 1 from its first 9 tokens gives the reference's incremental logits, with the
    cache as per-layer arrays (what generate uses) and stacked."""
    d = io("glm-original")
    lm = load("glm-original")
    row, n = int(d["incr_row"]), int(d["incr_context_len"])
    ids = d["input_ids"][row : row + 1]
    from glm_jax.model.transformer import init_cache

    pos = d["position_ids"][row : row + 1]
    T = ids.shape[1]
    allowed = (np.arange(T)[None, :] < d["sep"][row]) | (np.arange(T)[None, :] <= np.arange(T)[:, None])
    # teacher-forced: feed the context, then tokens n..n+3 one at a time through the cache
    cfg = lm.config
    S = n + 4
    cache = init_cache(cfg, 1, S, per_layer=per_layer)
    a = np.zeros((1, n, S), bool)
    a[0, :, :n] = allowed[:n, :n]
    logits, cache = lm.module.apply({"params": lm.params}, ids[:, :n], a, pos[..., :n], cache, 0, method="decode")
    steps = [np.asarray(logits[0, -1])]
    for t in range(n, n + 3):
        a = np.zeros((1, 1, S), bool)
        a[0, 0, : t + 1] = True
        logits, cache = lm.module.apply(
            {"params": lm.params}, ids[:, t : t + 1], a, pos[..., t : t + 1], cache, t, method="decode"
        )
        steps.append(np.asarray(logits[0, -1]))
    assert np.abs(np.stack(steps) - d["incr_step_logits"]).max() <= 1e-4


def lm_path(name, sub="model"):
    from helpers.fixture_models import FIX

    return FIX / name / sub
