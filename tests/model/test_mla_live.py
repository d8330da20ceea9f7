"""Live parity with transformers' Glm4MoeLiteForCausalLM and GlmMoeDsaForCausalLM on random tiny configs the fixtures
do not cover: a query without the low-rank latent (q_proj), rotate-half rotary (rope_interleave=false), attention
biases and a sparse/dense MLP pattern that is not a prefix. Logits with left padding and greedy decoding from the
latent cache, with scan_layers off and on.

GLM-5's indexer is not tested here on random weights: its ReLU scores tie at exactly 0 for many keys of a random
model, and transformers' top-k then breaks the ties in an order of its own; the fixture (transformers-glm-moe-dsa)
was drawn with every choice at least 1e-3 from a tie."""

import numpy as np
import pytest
import torch
import transformers

COMMON = dict(
    vocab_size=160,
    hidden_size=48,
    intermediate_size=80,
    moe_intermediate_size=24,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=6,
    num_experts_per_tok=2,
    n_shared_experts=1,
    kv_lora_rank=24,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    max_position_embeddings=128,
    pad_token_id=0,
    eos_token_id=[1],
    attn_implementation="eager",
)
LITE = [
    dict(q_lora_rank=None, rope_interleave=False, attention_bias=True, num_hidden_layers=3),
    dict(
        q_lora_rank=32,
        rope_interleave=True,
        attention_bias=False,
        num_hidden_layers=3,
        mlp_layer_types=["sparse", "dense", "sparse"],
        rope_parameters={"rope_type": "default", "rope_theta": 5e4},
    ),
]


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1 + 0.1 * r if name.endswith("weight") else 0.1 * r)
            elif name.endswith("bias"):
                p.copy_(0.1 * r)
            elif name.endswith("mlp.gate.weight"):
                p.copy_(0.5 * r)
            else:
                p.copy_(0.08 * r)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))


def _batch(seed, T=14):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 160, size=(3, T))
    mask = np.ones((3, T), np.int64)
    mask[1, :3] = 0
    mask[2, :5] = 0
    ids[mask == 0] = 0
    return ids, mask, np.clip(mask.cumsum(1) - 1, 0, None)


def _check(model, path, seed):
    import glm_jax

    ids, mask, pos = _batch(seed)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
    real = mask.astype(bool)
    new = 6
    with torch.no_grad():
        hf = model.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=[-5],
            pad_token_id=0,
        ).numpy()
    for scan in (False, True):
        lm = glm_jax.from_pretrained(path, scan_layers=scan)
        ours = np.asarray(lm(ids, attention_mask=mask))
        assert np.abs(ours - ref.logits.numpy())[real].max() <= 1e-4
        out = lm.generate(ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[-5])
        np.testing.assert_array_equal(out, hf)
    return lm


@pytest.mark.parametrize("i", range(len(LITE)))
def test_glm4_moe_lite_variants_match_transformers(i, tmp_path):
    torch.manual_seed(i)
    model = transformers.Glm4MoeLiteForCausalLM(transformers.Glm4MoeLiteConfig(**COMMON, **LITE[i])).eval()
    _randomise(model, i)
    model.save_pretrained(tmp_path)
    lm = _check(model, tmp_path, i)
    c = lm.config
    assert c.q_lora_rank == (LITE[i]["q_lora_rank"] or 0) and c.qkv_bias == LITE[i]["attention_bias"]
    assert c.position_encoding == ("rope_interleaved" if LITE[i]["rope_interleave"] else "rope_half")
