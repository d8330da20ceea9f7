"""Quantized weights in the model: ChatGLM's int8 / int4 checkpoints load and stay quantized in memory, and
from_pretrained(quantize=) quantizes any family at load.

Expected side: the float model built from the dequantized weights (q · scale, computed here in torch / numpy
from the spec's nibble layout, not with glm_jax.quant). Tolerance on float32 logits: 1e-5 + 1e-6 · max|logit|
(measured: at most 2.7e-5 on ChatGLM-6B, whose logits reach 35; 2e-6 to 8e-6 elsewhere). The quantized path
computes (x · q) · scale where the float model computes x · (q · scale); both are float32 products over the same
exact values (q · scale is exact in float32: 8-bit q times an 11-bit float16 scale), so they differ
only by float32 rounding order, the same size as between two float32 implementations of one model (the float
path's fixture tests allow 1e-4, 5e-4 on ChatGLM-6B).
"""

import json

import numpy as np
import pytest
from helpers.fixture_models import FIX, io, reference_inputs
from helpers.quant_reference import close, dequantized, np_unpack

import glm_jax
from glm_jax.errors import ConfigError

LINEARS = ("query_key_value.weight", "dense.weight", "dense_h_to_4h.weight", "dense_4h_to_h.weight")


def torch_quantize(w, bits):
    import torch

    w = w.half()
    scale = (w.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)).half()
    q = torch.round(w / scale[:, None]).to(torch.int8)
    return q, scale


def torch_pack(q):
    import torch

    return (
        (((q[:, 0::2].to(torch.int32) << 4) | (q[:, 1::2].to(torch.int32) & 0xF)) & 0xFF)
        .to(torch.uint8)
        .view(torch.int8)
    )


def write_pair(tmp_path, name, bits):
    """(quantized folder as THUDM ships one, float folder of its dequantized weights), both written by torch."""
    import torch

    src = FIX / name / "model"
    sd = torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
    cfg = json.loads((src / "config.json").read_text())
    qsd, fsd = {}, {}
    for k, t in sd.items():
        if ".layers." in k and k.endswith(LINEARS):
            q, s = torch_quantize(t, bits)
            qsd[k] = torch_pack(q) if bits == 4 else q
            qsd[k + "_scale"] = s
            fsd[k] = q.float() * s.float()[:, None]
        else:
            qsd[k] = t.half() if t.is_floating_point() else t
            fsd[k] = qsd[k].float() if t.is_floating_point() else t
    qdir, fdir = tmp_path / f"{name}-int{bits}", tmp_path / f"{name}-deq{bits}"
    for d, state, extra in [
        (qdir, qsd, {"quantization_bit": bits, "quantization_embeddings": False, "torch_dtype": "float16"}),
        (fdir, fsd, {}),
    ]:
        d.mkdir()
        torch.save(state, d / "pytorch_model.bin")
        (d / "config.json").write_text(json.dumps({**cfg, **extra}, indent=2))
    return qdir, fdir


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", ["chatglm-6b", "chatglm2-6b"])
def test_quantized_checkpoint_logits(tmp_path, name, bits):
    qdir, fdir = write_pair(tmp_path, name, bits)
    lq, lf = glm_jax.from_pretrained(qdir), glm_jax.from_pretrained(fdir)
    assert lq.config.quantization_bit == bits and lf.config.quantization_bit == 0
    q = lq.params["layers_0"]["block"]["mlp"]["down"]
    ffn = lq.config.ffn_size
    assert q["kernel"].dtype == np.int8 and q["kernel"].shape[0] == (ffn // 2 if bits == 4 else ffn)
    assert q["kernel_scale"].shape == (lq.config.hidden_size,)
    d = io(name)
    kw, real = reference_inputs(name, d)
    a, b = np.asarray(lq(d["input_ids"], **kw)), np.asarray(lf(d["input_ids"], **kw))
    assert close(a, b, real)
    ids = d["input_ids"]
    am = None if name == "chatglm-6b" else d["attention_mask"]
    gq = lq.generate(ids, attention_mask=am, max_new_tokens=6, eos_token_id=[-1])
    gf = lf.generate(ids, attention_mask=am, max_new_tokens=6, eos_token_id=[-1])
    assert np.array_equal(np.asarray(gq), np.asarray(gf))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", ["transformers-glm4", "glm-original", "chatglm2-6b"])
def test_quantize_at_load(name, bits):
    lf = glm_jax.from_pretrained(FIX / name / "model")
    lq = glm_jax.from_pretrained(FIX / name / "model", quantize=f"int{bits}")
    assert lq.config.quantization_bit == bits
    # the rule, per output channel: scale = max|w| over the in dims / qmax, q = round half to even of w / scale
    w = np.asarray(lf.params["layers_1"]["block"]["attn"]["o"]["kernel"])  # [N, H, D]: two in dims
    got = lq.params["layers_1"]["block"]["attn"]["o"]
    scale = np.abs(w).max(axis=(0, 1)) / (2 ** (bits - 1) - 1)
    np.testing.assert_allclose(np.asarray(got["kernel_scale"]), scale, rtol=1e-7)
    q = np_unpack(got["kernel"], 1) if bits == 4 else np.asarray(got["kernel"])
    assert np.array_equal(q, np.round(w / scale))
    # logits: the float model with the dequantized weights
    ref = glm_jax.GLM(lf.config, dequantized(glm_jax.api.cast_params(lq.params, lf.config), bits))
    d = io(name)
    kw, real = reference_inputs(name, d)
    a, b = np.asarray(lq(d["input_ids"], **kw)), np.asarray(ref(d["input_ids"], **kw))
    assert close(a, b, real)
    err = np.abs(a - np.asarray(lf(d["input_ids"], **kw)))[real].max()
    assert 0 < err < (1.0 if bits == 8 else 10.0)  # quantized, and not garbage


def test_bf16_matmuls_take_bf16_weights():
    """In bfloat16 the int8 kernels enter every matrix product as bf16 (the MXU operand on TPU): no product
    reads a float32 copy of a weight."""
    import jax

    lq = glm_jax.from_pretrained(FIX / "chatglm2-6b" / "model", dtype="bfloat16", quantize="int8")
    ids = io("chatglm2-6b")["input_ids"]
    jaxpr = jax.make_jaxpr(lambda p: lq.module.apply({"params": p}, ids))(lq.params)
    dots = []

    def walk(j):
        for e in j.eqns:
            if e.primitive.name == "dot_general":
                dots.append(tuple(str(v.aval.dtype) for v in e.invars))
            for sub in jax.core.jaxprs_in_params(e.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    assert len(dots) >= 2 * 4 and all(d == ("bfloat16", "bfloat16") for d in dots), dots


def test_refusals(tmp_path):
    with pytest.raises(ConfigError, match="quantize='int3'"):
        glm_jax.from_pretrained(FIX / "chatglm2-6b" / "model", quantize="int3")
    qdir, _ = write_pair(tmp_path, "chatglm2-6b", 8)
    with pytest.raises(ConfigError, match="already quantized to 8 bits"):
        glm_jax.from_pretrained(qdir, quantize="int4")
    assert glm_jax.from_pretrained(qdir, quantize="int8").config.quantization_bit == 8
    cfg = json.loads((qdir / "config.json").read_text())
    (qdir / "config.json").write_text(json.dumps({**cfg, "quantization_embeddings": True}))
    with pytest.raises(ConfigError, match="quantization_embeddings"):
        glm_jax.from_pretrained(qdir)
