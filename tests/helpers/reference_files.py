"""Checkpoint files read back with the reference libraries (the safetensors library, torch.load), never with
glm-jax's own readers: the expected side of the conversion tests."""

import json
import pathlib
import struct


def read_tensors(folder) -> dict:
    """{"order": [keys in file order, files by name], "t": {key: (dtype, shape, bytes)}} via the reference libraries."""
    import torch
    from safetensors import safe_open

    folder = pathlib.Path(folder)
    order, t = [], {}
    for f in sorted(folder.glob("*.safetensors")):
        raw = f.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        keys = [k for k in json.loads(raw[8 : 8 + n]) if k != "__metadata__"]
        with safe_open(f, "pt") as h:
            for k in keys:
                x = h.get_tensor(k)
                t[k] = (str(x.dtype), tuple(x.shape), x.contiguous().view(torch.uint8).numpy().tobytes())
        order += keys
    for f in sorted(folder.glob("*.bin")):
        sd = torch.load(f, map_location="cpu", weights_only=True)
        for k, x in sd.items():
            t[k] = (str(x.dtype), tuple(x.shape), x.contiguous().view(torch.uint8).numpy().tobytes())
        order += list(sd)
    return {"order": order, "t": t}


def safetensors_lib_order(tensors: dict) -> list:
    """The key order the safetensors library itself writes for these tensors."""
    import safetensors.torch
    import torch

    sd = {
        k: torch.frombuffer(bytearray(b), dtype=getattr(torch, dt.split(".")[1])).reshape(shape)
        if b
        else torch.empty(shape, dtype=getattr(torch, dt.split(".")[1]))
        for k, (dt, shape, b) in tensors.items()
    }
    raw = safetensors.torch.save(sd, metadata={"format": "pt"})
    n = struct.unpack("<Q", raw[:8])[0]
    return [k for k in json.loads(raw[8 : 8 + n]) if k != "__metadata__"]
