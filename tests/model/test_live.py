"""Live parity with transformers' PyTorch GlmForCausalLM / Glm4ForCausalLM on random tiny configs."""

import numpy as np
import pytest
import torch
import transformers

CASES = [  # (class, seed, heads, kv heads, head_dim, layers, rope factor, theta)
    ("glm", 0, 4, 1, 8, 2, 0.5, 10000.0),
    ("glm", 1, 6, 2, 16, 3, 0.5, 5e6),
    ("glm", 2, 4, 4, 8, 1, 1.0, 500.0),
    ("glm4", 3, 8, 2, 8, 2, 0.5, 10000.0),
    ("glm4", 4, 4, 2, 16, 3, 0.25, 1e5),
]


def _build(kind, seed, n, k, hd, layers, factor, theta, tmp_path):
    torch.manual_seed(seed)
    cls, cfg_cls = (
        (transformers.GlmForCausalLM, transformers.GlmConfig)
        if kind == "glm"
        else (transformers.Glm4ForCausalLM, transformers.Glm4Config)
    )
    cfg = cfg_cls(
        vocab_size=300 + seed,
        hidden_size=48,
        intermediate_size=80 + 8 * seed,
        num_hidden_layers=layers,
        num_attention_heads=n,
        num_key_value_heads=k,
        head_dim=hd,
        partial_rotary_factor=factor,
        rope_theta=theta,
        rms_norm_eps=1e-5 * (seed + 1),
        attention_bias=seed % 2 == 0,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=[1, 2],
        tie_word_embeddings=False,
    )
    model = cls(cfg).eval()
    with torch.no_grad():  # make norms and biases non-trivial
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    path = tmp_path / f"{kind}-{seed}"
    model.save_pretrained(path, safe_serialization=seed % 2 == 0)
    return model, path


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-seed{c[1]}-gqa{c[2]}x{c[3]}" for c in CASES])
def test_live_parity_with_transformers(case, tmp_path):
    import glm_jax

    model, path = _build(*case, tmp_path)
    rng = np.random.default_rng(case[1])
    B, T = 3, 10
    ids = rng.integers(3, 250, size=(B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, :3] = 0  # left padding
    mask[2, :6] = 0
    ids[mask == 0] = 0
    with torch.no_grad():
        ref = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(np.clip(mask.cumsum(1) - 1, 0, None)),
        ).logits.numpy()
    lm = glm_jax.from_pretrained(path)
    assert lm.config.family == ("glm-hf" if case[0] == "glm" else "glm4")
    ours = np.asarray(lm(ids, attention_mask=mask))
    real = mask.astype(bool)
    assert np.abs(ours - ref)[real].max() <= 1e-4

    # greedy generation with left padding: token for token, and cached steps equal a full forward
    new = 6
    with torch.no_grad():
        hf = model.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=new,
            do_sample=False,
            num_beams=1,
            eos_token_id=[-5],
            pad_token_id=0,
        ).numpy()
    out, steps = lm.generate(ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[-5], return_logits=True)
    np.testing.assert_array_equal(out, hf)
    full_mask = np.concatenate([mask, np.ones((B, new), np.int64)], 1)
    full = np.asarray(lm(out, attention_mask=full_mask))
    assert np.abs(full[:, T - 1 : -1] - steps).max() <= 1e-4


def test_generation_stops_at_eos_and_pads(tmp_path):
    import glm_jax

    model, path = _build("glm", 7, 4, 2, 8, 1, 0.5, 10000.0, tmp_path)
    lm = glm_jax.from_pretrained(path)
    ids = np.array([[5, 6, 7, 8]])
    free = lm.generate(ids, max_new_tokens=5, eos_token_id=[-5])
    stop = int(free[0, 5])  # declare the second generated token an eos: generation stops after it
    out = lm.generate(ids, max_new_tokens=5, eos_token_id=[stop], pad_token_id=0)
    np.testing.assert_array_equal(out[0, :6], free[0, :6])
    assert (out[0, 6:] == 0).all()


def test_sampling_is_seeded_and_respects_top_k(tmp_path):
    import glm_jax

    _, path = _build("glm4", 8, 4, 2, 8, 1, 0.5, 10000.0, tmp_path)
    lm = glm_jax.from_pretrained(path)
    ids = np.array([[5, 6, 7, 8], [9, 10, 11, 12]])
    a = lm.generate(ids, max_new_tokens=8, do_sample=True, temperature=1.5, seed=3, eos_token_id=[-5])
    b = lm.generate(ids, max_new_tokens=8, do_sample=True, temperature=1.5, seed=3, eos_token_id=[-5])
    c = lm.generate(ids, max_new_tokens=8, do_sample=True, temperature=1.5, seed=4, eos_token_id=[-5])
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    g = lm.generate(ids, max_new_tokens=8, eos_token_id=[-5])
    k1 = lm.generate(ids, max_new_tokens=8, do_sample=True, top_k=1, seed=5, eos_token_id=[-5])
    np.testing.assert_array_equal(k1, g)  # top-k 1 is greedy
    p0 = lm.generate(ids, max_new_tokens=8, do_sample=True, top_p=1e-6, seed=6, eos_token_id=[-5])
    np.testing.assert_array_equal(p0, g)  # top-p below the top token's mass keeps only it
