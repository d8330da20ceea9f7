"""dtype names of the checkpoint formats: safetensors' names <-> numpy dtypes (bfloat16 and float8 through
ml_dtypes) and torch dtypes, and a torch tensor's bytes as a numpy array."""

from __future__ import annotations

import ml_dtypes
import numpy as np

ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}
ST_NAMES = {np.dtype(v): k for k, v in ST_DTYPES.items()}
_TORCH_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def np_dtype(name: str) -> np.dtype:
    return np.dtype(ST_DTYPES[name])


def st_name(dtype) -> str:
    return ST_NAMES[np.dtype(dtype)]


def torch_dtype(name: str):
    """The torch dtype of a safetensors dtype name."""
    import torch

    return getattr(torch, _TORCH_NAMES[name])


def torch_to_numpy(t) -> np.ndarray:
    """A CPU tensor's values as numpy (bfloat16 through ml_dtypes, the same bytes)."""
    import torch

    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()
