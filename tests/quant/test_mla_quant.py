"""from_pretrained(quantize=) on the MoE families: GLM-4.7-Flash (glm4-moe-lite), GLM-5 (glm-moe-dsa) and GLM-4.5
(glm4-moe). Every layer linear is int8 (int4: packed), the MLA projections included (q_a/q_b or q, the kv latent
and the rotary key of kv_a_proj_with_mqa, kv_b_proj, o_proj; GLM-5's indexer projections too); the MoE router and
the routed experts stay float.

Expected side: the float model given the dequantized weights q · scale (numpy, test_quant_model.dequantized from
the nibble layout), on the fixture's inputs. Tolerance: test_quant_model's, 1e-5 + 1e-6 · max|logit| (the two
sides are float32 products over the same exact values in a different order: (x · q) · scale against
x · (q · scale); kv_b_proj's kernel is dequantized in float32 before use, so it is the same on both sides)."""

import numpy as np
import pytest
from helpers import FIX
from helpers.quant_reference import close, dequantized, np_unpack

import glm_jax
from glm_jax.api import cast_params

LITE, DSA, MOE = "transformers-glm4-moe-lite", "transformers-glm-moe-dsa", "transformers-glm4-moe"
MLA_LINEARS = ("q_a", "q_b", "kv_a", "k_rope", "kv_b", "o")


def _inputs(name):
    d = dict(np.load(FIX / name / "io.npz"))
    B, T = d["input_ids"].shape
    kw = {"attention_mask": d["attention_mask"], "position_ids": np.broadcast_to(np.arange(T), (B, T))}
    return d, kw, d["attention_mask"] == 1


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", [LITE, DSA, MOE])
def test_quantize_at_load(name, bits):
    lf = glm_jax.from_pretrained(FIX / name / "model")
    lq = glm_jax.from_pretrained(FIX / name / "model", quantize=f"int{bits}")
    c = lq.config
    assert c.quantization_bit == bits
    moe_layer = next(i for i in range(c.num_layers) if c.is_moe_layer(i))
    block = lq.params[f"layers_{moe_layer}"]["block"]
    attn = block["attn"]
    if c.mla:
        for m in MLA_LINEARS:
            assert attn[m]["kernel"].dtype == np.int8 and "kernel_scale" in attn[m], m
        # kv_b_proj [R, N, C + E]: R packed in pairs at 4 bits, one scale per output (head, feature)
        R, N, X = c.kv_lora_rank, c.num_heads, c.qk_nope_head_dim + c.value_head_dim
        assert attn["kv_b"]["kernel"].shape == ((R // 2 if bits == 4 else R), N, X)
        assert attn["kv_b"]["kernel_scale"].shape == (N, X)
        # the rule, per output channel: scale = max|w| over R / qmax, q = round(w / scale)
        w = np.asarray(lf.params[f"layers_{moe_layer}"]["block"]["attn"]["kv_b"]["kernel"])
        scale = np.abs(w).max(axis=0) / (2 ** (bits - 1) - 1)
        np.testing.assert_allclose(np.asarray(attn["kv_b"]["kernel_scale"]), scale, rtol=1e-7)
        q = np_unpack(attn["kv_b"]["kernel"], 0) if bits == 4 else np.asarray(attn["kv_b"]["kernel"])
        assert np.array_equal(q, np.round(w / scale))
    else:
        assert all(attn[m]["kernel"].dtype == np.int8 for m in ("q", "k", "v", "o"))
    if c.index_topk:  # the first layer runs its own indexer ("full")
        ind = lq.params["layers_0"]["block"]["attn"]["indexer"]
        assert all(ind[m]["kernel"].dtype == np.int8 for m in ("wq_b", "wk", "weights_proj"))
    assert block["moe"]["router"]["kernel"].dtype == np.float32 and "kernel_scale" not in block["moe"]["router"]
    assert block["moe"]["experts"]["gate"].dtype == np.float32
    assert block["moe"]["shared"]["down"]["kernel"].dtype == np.int8  # the shared expert is a layer linear

    ref = glm_jax.GLM(lf.config, dequantized(cast_params(lq.params, lf.config), bits))
    d, kw, real = _inputs(name)
    a, b = np.asarray(lq(d["input_ids"], **kw)), np.asarray(ref(d["input_ids"], **kw))
    assert close(a, b, real), float(np.abs(a - b)[real].max())
    err = np.abs(a - np.asarray(lf(d["input_ids"], **kw)))[real].max()
    assert 0 < err < (1.0 if bits == 8 else 10.0)  # quantized, and not garbage
    # decode (MLA: absorbed attention over the latent cache, with the quantized kv_b_proj split in two halves)
    gq = lq.generate(d["input_ids"], attention_mask=d["attention_mask"], max_new_tokens=6, eos_token_id=[-1])
    gf = ref.generate(d["input_ids"], attention_mask=d["attention_mask"], max_new_tokens=6, eos_token_id=[-1])
    np.testing.assert_array_equal(np.asarray(gq), np.asarray(gf))
