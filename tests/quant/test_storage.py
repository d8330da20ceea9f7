"""glm-convert quantize: ChatGLM's int8 / int4 storage (specs/CHATGLM_ARCH.md §8), byte for byte.

The expected side is an independent torch rendering of the reference's `model.half().quantize(bits)` written
here from the spec (weight.half(); scale = max|w| / (2^(bits-1) - 1) per row, in half; torch.round, half to
even; int8; two values per byte, element 2j in the high nibble), applied to each fixture as read by torch.load /
safetensors. Every chatglm and chatglm2 fixture, both widths; then a hand-worked row pins the nibble order and
the rounding, and to-torch of a quantized checkpoint (after to-jax) writes the same storage back.
"""

import json
import pathlib

import numpy as np
import pytest
from helpers.fixture_models import FIX

from convert.cli import main

CHATGLM_FIXTURES = ["chatglm-6b", "chatglm2-6b", "chatglm2-6b-ptuning-v2", "chatglm3-6b-32k", "glm-4-9b-chat-remote"]
LINEARS = ("query_key_value.weight", "dense.weight", "dense_h_to_4h.weight", "dense_4h_to_h.weight")


def read_sd(folder) -> dict:
    """Every tensor of a checkpoint folder, as torch tensors, read by the reference libraries."""
    import torch
    from safetensors.torch import load_file

    folder = pathlib.Path(folder)
    sd = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(f))
    for f in sorted(folder.glob("*.bin")):
        sd.update(torch.load(f, map_location="cpu", weights_only=True))
    return sd


def torch_quantize(w, bits):
    """The reference's storage of one linear, from the spec: (weight int8 [out, in or in/2], scale half [out])."""
    import torch

    w = w.half()
    scale = (w.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)).half()
    q = torch.round(w / scale[:, None]).to(torch.int8)
    if bits == 4:
        hi = q[:, 0::2].to(torch.int32) << 4
        lo = q[:, 1::2].to(torch.int32) & 0xF
        q = ((hi | lo) & 0xFF).to(torch.uint8).view(torch.int8)
    return q, scale


def is_linear(key) -> bool:
    return ".layers." in key and key.endswith(LINEARS) and "prefix_encoder" not in key


def raw(t) -> bytes:
    import torch

    return t.contiguous().view(torch.uint8).numpy().tobytes()


def quantize(src, dst, bits, *extra):
    assert main(["quantize", str(src), str(dst), "--bits", str(bits), *extra]) == 0


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", CHATGLM_FIXTURES)
def test_storage_matches_reference_rule(tmp_path, name, bits):
    import torch

    src = FIX / name / "model"
    quantize(src, tmp_path / "q", bits)
    ref, got = read_sd(src), read_sd(tmp_path / "q")
    linears = [k for k in ref if is_linear(k)]
    assert len(linears) == 4 * json.loads((src / "config.json").read_text())["num_layers"]
    assert set(got) == set(ref) | {k + "_scale" for k in linears}
    for k, t in ref.items():
        if k in linears:
            q, s = torch_quantize(t, bits)
            assert got[k].dtype == torch.int8 and tuple(got[k].shape) == tuple(q.shape), k
            assert raw(got[k]) == raw(q), k
            assert got[k + "_scale"].dtype == torch.float16 and raw(got[k + "_scale"]) == raw(s), k
            assert int(q.abs().max()) <= 127 and (bits == 8 or int(torch_unpack(q).abs().max()) <= 7)
        else:
            want = t.half() if t.is_floating_point() else t
            assert got[k].dtype == want.dtype and raw(got[k]) == raw(want), k
    cfg_src = json.loads((src / "config.json").read_text())
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg == {**cfg_src, "quantization_bit": bits, "torch_dtype": "float16"}


def torch_unpack(p):
    import torch

    hi = p.to(torch.int32) >> 4
    lo = ((p.to(torch.int32) << 28) >> 28).to(torch.int32)
    return torch.stack([hi, lo], dim=-1).reshape(p.shape[0], -1)


def test_sharded_safetensors_source_same_storage(tmp_path):
    quantize(FIX / "chatglm2-6b" / "model", tmp_path / "a", 4)
    quantize(FIX / "chatglm2-6b" / "model_sharded_safetensors", tmp_path / "b", 4, "--max-shard-size", "100KB")
    a, b = read_sd(tmp_path / "a"), read_sd(tmp_path / "b")
    assert len(list((tmp_path / "b").glob("*.safetensors"))) > 1
    assert (tmp_path / "b" / "model.safetensors.index.json").is_file()
    assert set(a) == set(b) and all(raw(a[k]) == raw(b[k]) for k in a)


def test_hand_worked_rows():
    """The rule by hand: a row whose max is 7 (4 bits) or 127 (8 bits) has scale exactly 1, so q = round(w);
    the .5 cases go to the even neighbour, and [-7, 3, 5, -1] packs to bytes 0x93, 0x5F (high nibble first)."""
    from glm_jax.quant import pack_int4, quantize_rows, unpack_int4

    w4 = np.array([[-7, 3, 5, -1, 2.5, -2.5, 3.5, 0.5, -0.5, 1.5, 7, 0]], np.float32)
    q4, s4 = quantize_rows(w4, 4)
    assert s4.dtype == np.float16 and s4.tolist() == [1.0]
    want = [-7, 3, 5, -1, 2, -2, 4, 0, 0, 2, 7, 0]  # 2.5→2, -2.5→-2, 3.5→4, ±0.5→0, 1.5→2
    assert q4.view(np.uint8).tolist() == [[0x93, 0x5F, 0x2E, 0x40, 0x02, 0x70]]
    assert unpack_int4(q4).tolist() == [want]
    assert pack_int4(np.array([want], np.int8)).tolist() == q4.tolist()
    w8 = np.array([[127, 2.5, 1.5, -0.5, -126.5, 0.25]], np.float32)
    q8, s8 = quantize_rows(w8, 8)
    assert s8.tolist() == [1.0] and q8.tolist() == [[127, 2, 2, 0, -126, 0]]
    # the division is in half precision: scale = 0.6997 / 7 = 0.10004 (half); 0.34985 / 0.10004 = 3.4971, which
    # half precision rounds to 3.5, and round half to even gives 4 (a float32 division would give 3)
    q, s = quantize_rows(np.array([[0.7, 0.35, -0.7, 0.0]], np.float32), 4)
    assert s.tolist() == [0.10003662109375]
    assert unpack_int4(q).tolist() == [[7, 4, -7, 0]]


def test_to_torch_writes_the_quantized_storage_back(tmp_path):
    for name, bits in [("chatglm-6b", 4), ("chatglm2-6b", 8)]:
        quantize(FIX / name / "model", tmp_path / f"{name}-q", bits)
        assert main(["to-jax", str(tmp_path / f"{name}-q"), str(tmp_path / f"{name}-jax")]) == 0
        assert main(["to-torch", str(tmp_path / f"{name}-jax"), str(tmp_path / f"{name}-back"), "--format", "bin"]) == 0
        a = (tmp_path / f"{name}-q" / "pytorch_model.bin").read_bytes()
        b = (tmp_path / f"{name}-back" / "pytorch_model.bin").read_bytes()
        assert a == b, name
        cfg = json.loads((tmp_path / f"{name}-back" / "config.json").read_text())
        assert cfg["quantization_bit"] == bits


@pytest.mark.parametrize(
    "case",
    ["glm4", "bits", "already"],
)
def test_refusals(tmp_path, capsys, case):
    if case == "glm4":
        args = ["quantize", str(FIX / "transformers-glm4" / "model"), str(tmp_path / "o"), "--bits", "8"]
        need = "quantization_bit"
    elif case == "bits":
        args = ["quantize", str(FIX / "chatglm2-6b" / "model"), str(tmp_path / "o"), "--bits", "3"]
        need = "--bits"
    else:
        quantize(FIX / "chatglm2-6b" / "model", tmp_path / "q", 8)
        args = ["quantize", str(tmp_path / "q"), str(tmp_path / "o"), "--bits", "4"]
        need = "already quantized"
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and need in err[0], err
    assert not (tmp_path / "o").exists()
