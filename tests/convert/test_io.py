"""The streaming writers against the libraries they imitate: safetensors, torch.save, huggingface_hub's sharding
and transformers' size strings. Byte-identical files, so the outputs load wherever the originals do."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest

from convert import torch_io
from convert.torch_io import Entry


def _tensors():
    import torch

    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.w": torch.randn(3, 5, generator=g),
        "bias": torch.randn(7, generator=g).half(),
        "a_bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "ids": torch.arange(6).reshape(2, 3),
        "i32": torch.arange(4, dtype=torch.int32),
        "mask": torch.tensor([True, False, True]),
        "u8": torch.arange(5, dtype=torch.uint8),
        "i8": torch.arange(-2, 2, dtype=torch.int8),
        "i16": torch.arange(3, dtype=torch.int16),
        "f64": torch.randn(2, dtype=torch.float64, generator=g),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
        "f8b": torch.randn(4, generator=g).to(torch.float8_e5m2),
    }


def _np(t):
    import torch

    views = {
        torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
        torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
        torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2),
    }
    if t.dtype in views:
        via, dt = views[t.dtype]
        return t.view(via).numpy().view(dt)
    return t.numpy()


def _entries(sd):
    return [Entry(k, torch_io.st_name(_np(v).dtype), tuple(v.shape)) for k, v in sd.items()]


def test_safetensors_file_equals_the_librarys(tmp_path):
    import safetensors.torch

    sd = _tensors()
    safetensors.torch.save_file(sd, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    torch_io.write_safetensors(
        tmp_path / "ours.safetensors", torch_io.st_order(_entries(sd)), {"format": "pt"}, lambda k: _np(sd[k])
    )
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_bin_file_equals_torch_save(tmp_path):
    import torch

    sd = {k: v for k, v in _tensors().items() if not k.startswith("f8")}
    sd.update({f"layer.{i}.weight": torch.full((2,), float(i)) for i in range(1100)})  # > 1000 items: batched
    sd["tied"] = sd["model.layers.0.w"].clone()  # same shape, own tuple
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    torch.save(sd, tmp_path / "a" / "pytorch_model.bin")
    torch_io.write_bin(tmp_path / "b" / "pytorch_model.bin", _entries(sd), lambda k: _np(sd[k]))
    assert (tmp_path / "b" / "pytorch_model.bin").read_bytes() == (tmp_path / "a" / "pytorch_model.bin").read_bytes()
    back = torch.load(tmp_path / "b" / "pytorch_model.bin", weights_only=True, mmap=True)
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_bin_refuses_dtypes_torch_save_cannot_name(tmp_path):
    with pytest.raises(ValueError, match="safetensors"):
        torch_io.write_bin(
            tmp_path / "x.bin", [Entry("f8", "F8_E4M3", (2,))], lambda k: np.zeros(2, ml_dtypes.float8_e4m3fn)
        )


def test_produced_tensor_must_match_the_plan(tmp_path):
    with pytest.raises(ValueError, match="planned"):
        torch_io.write_safetensors(
            tmp_path / "x.safetensors", [Entry("w", "F32", (2, 2))], None, lambda k: np.zeros((2, 3), np.float32)
        )


@pytest.mark.parametrize("limit", [1000, 5000, 20000])
def test_sharding_follows_huggingface_hub(limit):
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards

    g = torch.Generator().manual_seed(1)
    sd = {f"t{i}": torch.zeros(int(n)) for i, n in enumerate(torch.randint(1, 3000, (40,), generator=g))}
    sd["huge"] = torch.zeros(8000)
    ref = split_torch_state_dict_into_shards(sd, max_shard_size=limit)
    shards = torch_io.split_shards(_entries(sd), limit)
    names = torch_io.shard_file_names("safetensors", len(shards))
    got = {n: [e.key for e in es] for n, es in zip(names, shards)}
    assert got == ref.filename_to_tensors
    _, text = torch_io.index_json("safetensors", list(zip(names, shards)))
    idx = json.loads(text)
    assert idx["metadata"]["total_size"] == ref.metadata["total_size"] and idx["weight_map"] == ref.tensor_to_filename


@pytest.mark.parametrize("text", ["5GB", "500MB", "2GiB", "3MiB", "100KB", "8Gb", "1000"])
def test_sizes_read_like_transformers(text):
    from transformers.utils.hub import convert_file_size_to_int

    want = convert_file_size_to_int(int(text) if text.isdigit() else text)
    assert torch_io.parse_size(text) == want


def test_header_is_padded_to_eight_bytes():
    h = torch_io.st_header([Entry("x", "BF16", (3,))], None)
    (n,) = struct.unpack("<Q", h[:8])
    assert n % 8 == 0 and len(h) == 8 + n and json.loads(h[8:])["x"]["data_offsets"] == [0, 6]
