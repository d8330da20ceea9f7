"""`glm-convert quantize SRC DST --bits 8|4`: a float ChatGLM-6B / ChatGLM2-6B-family checkpoint -> what the
reference's `model.half().quantize(bits)` holds, saved (specs/CHATGLM_ARCH.md §8; glm_jax/quant/formats.py).

Every per-layer linear of the family's key map (query_key_value, dense, dense_h_to_4h, dense_4h_to_h) becomes
`<name>.weight` int8 ([out, in], for 4 bits [out, in/2] packed, high nibble first) followed by
`<name>.weight_scale` float16 [out]; every other floating tensor (embeddings, norms, biases, the output layer,
saved buffers) is written in float16, as the released int4 / int8 checkpoints store them. config.json gains
`quantization_bit` and `torch_dtype: float16`; the folder's other files (tokenizer, remote code) are copied.
Tensors are written one at a time in the source's order and format (.bin or safetensors), split into shards at
--max-shard-size (default 5GB) with an index json when there is more than one.
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np

from convert import guard, torch_io
from convert.torch_io import Entry
from glm_jax import families
from glm_jax.checkpoint.files import find_weight_files, tensor_shape
from glm_jax.checkpoint.hf import check_config_against_checkpoint, config_from_folder, open_weights
from glm_jax.errors import ConfigError
from glm_jax.quant.formats import check_bits, quantize_rows
from glm_jax.quant.rows import is_layer_linear

_FLOATS = ("F64", "F32", "F16", "BF16")


def linear_keys(cfg) -> set:
    """The checkpoint keys of the layer linears the reference's quantize() replaces."""
    return {r.hf[0] for r in families.keymap(cfg) if is_layer_linear(r)}


def _plan(readers, cfg, bits) -> tuple[list, dict]:
    """[Entry] in output order, and key -> (source key, kind) with kind 'weight', 'scale' or 'copy'."""
    qkeys = linear_keys(cfg)
    entries, how = [], {}
    for k, r in readers.items():
        shape = tensor_shape(r, k)
        dt = r.header[k]["dtype"] if hasattr(r, "header") else torch_io.st_name(r.get(k).dtype)
        if k in qkeys:
            if len(shape) != 2 or (bits == 4 and shape[1] % 2):
                raise ConfigError(f"{k}: a {bits}-bit linear needs a 2-D weight with an even in-size, got {shape}")
            entries.append(Entry(k, "I8", (shape[0], shape[1] // (8 // bits))))
            entries.append(Entry(k + "_scale", "F16", (shape[0],)))
            how[k], how[k + "_scale"] = (k, "weight"), (k, "scale")
        else:
            entries.append(Entry(k, "F16" if dt in _FLOATS else dt, tuple(shape)))
            how[k] = (k, "copy")
    return entries, how


class _Producer:
    def __init__(self, readers, how, bits, progress):
        self.readers, self.how, self.bits, self.progress, self.kept = readers, how, bits, progress, {}

    def __call__(self, key):
        guard.check_stop()
        src, kind = self.how[key]
        if kind == "copy":
            a = np.asarray(self.readers[src].get(src))
            if np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16":
                a = a.astype(np.float32).astype(np.float16) if a.dtype != np.float16 else a
        elif key in self.kept:
            a = self.kept.pop(key)
        else:
            w, s = quantize_rows(self.readers[src].get(src), self.bits)
            a, other = (w, s) if kind == "weight" else (s, w)
            self.kept[src if kind == "scale" else src + "_scale"] = other
        if self.progress is not None:
            self.progress(a.nbytes)
        return a


def quantize_checkpoint(src, dst, *, bits: int, max_shard=None, progress=None, on_total=None) -> dict:
    t0 = time.time()
    check_bits(bits)
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    fmt, _, _ = find_weight_files(src)
    if fmt == "megatron":
        raise ConfigError(f"{src}: a Megatron checkpoint; glm-convert quantize reads ChatGLM HF folders")
    cfg = config_from_folder(src)
    fam = families.get(cfg.family)
    if "quantization_bit" not in fam.to_hf(cfg):
        raise ConfigError(
            f"{src / 'config.json'}: a {cfg.family} model; ChatGLM's quantized format exists for the families whose "
            "config.json carries quantization_bit (ChatGLM-6B, ChatGLM2/3-6B); use from_pretrained(quantize=) instead"
        )
    if cfg.quantization_bit:
        raise ConfigError(f"{src / 'config.json'}: already quantized (quantization_bit={cfg.quantization_bit})")
    _, readers = open_weights(src)
    check_config_against_checkpoint(cfg, readers, str(src), str(src / "config.json"))
    missing = sorted(linear_keys(cfg) - set(readers))
    if missing:
        raise ConfigError(f"{src}: missing {len(missing)} linear weight(s) the config implies, e.g. {missing[:3]}")
    entries, how = _plan(readers, cfg, bits)
    shards = torch_io.split_shards(entries, torch_io.parse_size(max_shard or "5GB"))
    names = torch_io.shard_file_names(fmt, len(shards))
    md = {"format": "pt"} if fmt == "safetensors" else None
    files = [(n, torch_io.st_order(es) if fmt == "safetensors" else es) for n, es in zip(names, shards)]
    total = sum(e.nbytes for e in entries)
    if on_total:
        on_total(total)
    dst.mkdir(parents=True, exist_ok=True)
    produce = _Producer(readers, how, bits, progress)
    for name, es in files:
        torch_io.write_file(fmt, dst / name, es, md, produce)
    if len(files) > 1:
        index_name, text = torch_io.index_json(fmt, files)
        (dst / index_name).write_text(text)
    d = dict(cfg.hf_config)
    d["quantization_bit"] = bits
    d["torch_dtype"] = "float16"
    (dst / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    torch_io.copy_aux_files(src, dst)
    return {"tensors": len(entries), "bytes": total, "files": names, "seconds": time.time() - t0}
