"""A glm-train output_dir is a checkpoint folder for every command (DESIGN §3.6): beside `checkpoints/` it holds
the model's config.json (the family's own config.json, as `GLMConfig.to_hf()` writes it) and the tokenizer files
of the tokenizer the run was fed, so `glm-generate RUN`, `glm-convert to-torch RUN DST` and
`glm_jax.load_tokenizer(RUN)` read the run directly. Written by process 0 at the start of every run, each file
to a temporary name and then renamed (a reader never sees half a file). On GCS (output_dir=gs://...), the files
are made in a local temporary folder and uploaded one object each: an object appears whole or not at all.

Which tokenizer: `data.tokenizer` — the bundled one (its sentencepiece model proto, byte for byte, as
glm_sentencepiece.model), or the tokenizer files of the folder it names; a pretrained `model` folder's tokenizer
and generation files are copied first (data.tokenizer's win where both have a file). A model trained from scratch
gets a generation_config.json that samples (scratch_generation_config).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import tempfile

from glm_jax import storage
from glm_jax.tokenizers.files import copy_tokenizer_files
from glm_jax.tokenizers.sentencepiece import save_sentencepiece


def write_json(path: pathlib.Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_run_folder(out, cfg, tokenizer, data_tokenizer_spec, pretrained=None, extra_config=None) -> list[str]:
    """config.json and the tokenizer files into `out`; returns the names written.
    `tokenizer`: the data pipeline's tokenizer object; `data_tokenizer_spec`: the data.tokenizer setting;
    `extra_config`: keys added to config.json (an adapter's pre_seq_len / prefix_projection)."""
    if storage.is_remote(out):
        with tempfile.TemporaryDirectory(prefix="glm-run-folder-") as tmp:
            local = pathlib.Path(tmp)
            has_gen = storage.exists(storage.as_path(out) / "generation_config.json")
            if has_gen:  # kept, as on disk: not rewritten on a resume
                storage.copy(storage.as_path(out) / "generation_config.json", local / "generation_config.json")
            names = write_run_folder(local, cfg, tokenizer, data_tokenizer_spec, pretrained, extra_config)
            for n in names:
                if not (has_gen and n == "generation_config.json"):
                    storage.copy(local / n, storage.as_path(out) / n)
            return names
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    if pretrained:
        names += copy_tokenizer_files(pretrained, out)
    spec = "bundled" if data_tokenizer_spec is None else data_tokenizer_spec
    if isinstance(spec, (str, os.PathLike)) and str(spec) != "bundled":
        p = storage.as_path(spec)
        names += copy_tokenizer_files(p if p.is_dir() else p.parent, out)
    elif getattr(tokenizer, "model_proto", None) is not None:  # the bundled sentencepiece model
        names += save_sentencepiece(tokenizer.model_proto, out)
    config = {**cfg.to_hf(), **(extra_config or {})}
    lost = lost_fields(cfg, config)
    if lost:
        print(
            f"warning: {out / 'config.json'}: the {cfg.family} config.json cannot say {', '.join(lost)}; "
            "exports of this run will not load in the family's reference code",
            file=sys.stderr,
            flush=True,
        )
    write_json(out / "config.json", config)
    if not pretrained and not (out / "generation_config.json").exists():
        write_json(out / "generation_config.json", scratch_generation_config(cfg))
        names.append("generation_config.json")
    return sorted(set(names)) + ["config.json"]


def scratch_generation_config(cfg) -> dict:
    """The decoding defaults of a model trained from scratch (glm-generate and transformers read them): sampling
    at temperature 0.8 from the 200 likeliest tokens, as nanoGPT samples its few-minute models. Greedy decoding
    of such a model repeats its commonest tokens (in the bundled corpus, newlines: a blank reply); sampling shows
    what it learned. A run from a pretrained folder keeps that folder's generation_config.json."""
    gen = {"do_sample": True, "temperature": 0.8, "top_k": 200, "eos_token_id": list(cfg.eos_token_id)}
    return gen if cfg.pad_token_id is None else {**gen, "pad_token_id": cfg.pad_token_id}


_NOT_MATH = {"hf_config", "dtype", "param_dtype", "scan_layers", "remat", "attention", "index_dense"}


def lost_fields(cfg, config: dict) -> list[str]:
    """The model fields that config.json, read back by the family's reader, does not reproduce."""
    from glm_jax.config import GLMConfig

    try:
        back = GLMConfig.from_hf(config)
    except Exception as e:
        return [f"anything ({type(e).__name__}: {e})"]
    return [
        f"{f.name}={getattr(cfg, f.name)!r}"
        for f in dataclasses.fields(cfg)
        if f.name not in _NOT_MATH and getattr(cfg, f.name) != getattr(back, f.name)
    ]


def with_tokenizer_ids(cfg, tc):
    """A model whose default masks and generation need command-token ids (GLM's <sop>, [gMASK], <eop>) but whose
    config names none (a preset such as glm_small, trained on the bundled tokenizer) gets them from the run's
    tokenizer, so that the saved config (and config.json) can prompt and stop the model it trained. Fields the
    config already sets are kept; a causal model is left as it is."""
    if cfg.mask_rule == "causal" or cfg.bos_token_id is not None:
        return cfg
    from glm_jax.data.tokenize import resolve_tokenizer, special_ids

    data = dict(tc.data)
    try:
        ids = special_ids(resolve_tokenizer(data.get("tokenizer", "bundled"), data.get("cache_dir")))
    except (ValueError, TypeError, OSError):
        return cfg  # the data pipeline reports a bad tokenizer setting itself
    fill = {
        "bos_token_id": ids.sop,
        "mask_token_id": ids.mask,
        "gmask_token_id": ids.gmask,
        "smask_token_id": ids.smask,
        "eos_token_id": (ids.eop,) if ids.eop is not None else (ids.eos,),
    }
    return cfg.replace(**{k: v for k, v in fill.items() if getattr(cfg, k) in (None, ()) and v is not None})
