"""What a family module declares, and the small helpers several families' config.json readers share.

A family module builds one `Family` and names it `FAMILY`. The registry (`glm_jax/families/__init__.py`) lists
the modules; everything outside `glm_jax/families/` asks the registry or reads a `GLMConfig` field, and never
compares a family id with a literal.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from glm_jax.errors import ConfigError

# values that the reference config classes assume when a key is absent (so writing them adds nothing)
CLASS_DEFAULTS = {
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.5,
    "max_sequence_length": 512,
    "block_position_encoding": True,
    "tie_word_embeddings": False,
}


def no_buffers(cfg, dtype: str) -> list:
    return []


def any_file(path: str) -> bool:
    return True


def named_file(path: str, tokenizer_config: dict) -> int:
    return 1


@dataclasses.dataclass(frozen=True)
class TokenizerFormat:
    """How one of a family's released tokenizer folders is recognised and read (glm_jax.load_tokenizer's table).

    name                                the chat_format value (and the tokenizer's .chat_format)
    files                               the files it reads from a folder; the first is the one build() takes
    build(file, folder, tokenizer_config, **kwargs) -> GLMTokenizer
    fits(file) -> bool                  the file is of the kind this format reads; else refused even when the
                                        caller names the format
    score(file, tokenizer_config) -> int   when inferring the format: 0 not this format, 1 its files are there,
                                        2 the file's content or tokenizer_config.json says it is this format.
                                        The single highest score wins; a tie asks the caller to choose
    kind                                what fits() looks for, for the error when it says no
    what                                the files, for the error when a folder has none (default: files joined)
    unfit                               why score() said 0 for a file the caller named, for the error
    chat                                it has a chat template (GPT-2's BPE of the original GLM has none)
    """

    name: str
    files: tuple
    build: Callable
    fits: Callable[[str], bool] = any_file
    score: Callable[[str, dict], int] = named_file
    kind: str = ""
    what: str = ""
    unfit: str = ""
    chat: bool = True


@dataclasses.dataclass(frozen=True)
class Family:
    """One checkpoint family: how its config.json is recognised, read and written, its key map and presets.

    recognise(config_dict) -> bool        the registry asks the families in its order; the first yes wins
    from_hf(config_dict) -> dict          GLMConfig fields (masks and positions by the family's own rule)
    to_hf(cfg) -> dict                    the config.json keys that carry the model's fields
    base_hf(cfg) -> dict                  the other keys of a complete config.json, for a config without one
    rows                                  the key map (glm_jax/families/rows.py): HF keys <-> param paths
    presets                               released models: name -> the config.json they ship with
    buffers(cfg, dtype) -> list           saved non-parameter tensors the reference writes, as
                                          [(key, key it follows or None, array or ("alias", key))]
    tied_aliases                          keys the reference saves that repeat another tensor when
                                          tie_word_embeddings (not parameters)
    buffer_suffixes                       endings of saved buffers that are recomputed, not loaded
    optional_key_prefix                   keys may be stored without this prefix (Megatron mp_rank files)
    reads_megatron                        Megatron mp_rank checkpoints hold this family
    supports_ptuning                      P-Tuning v2 prefix checkpoints exist for this family
    dtype_key                             the config.json key that names the weights' dtype
    tokenizers                            its released tokenizers' formats (TokenizerFormat), which
                                          glm_jax.load_tokenizer reads; chat_formats: the names of those
                                          with a chat template
    fit_to_checkpoint(cfg, keys) -> cfg   adjusts a config to the keys a checkpoint folder holds, or None
    """

    id: str
    recognise: Callable[[dict], bool]
    from_hf: Callable[[dict], dict]
    to_hf: Callable
    base_hf: Callable
    rows: tuple
    presets: dict = dataclasses.field(default_factory=dict)
    buffers: Callable = no_buffers
    tied_aliases: dict = dataclasses.field(default_factory=dict)
    buffer_suffixes: tuple = ()
    optional_key_prefix: str = ""
    reads_megatron: bool = False
    supports_ptuning: bool = False
    dtype_key: str = "torch_dtype"
    tokenizers: tuple = ()
    fit_to_checkpoint: Callable | None = None

    def write_hf(self, cfg) -> dict:
        """config.json for `cfg`: the original's keys kept, the family's keys updated; keys the original did not
        have are added only when they carry information."""
        if not cfg.hf_config:
            return {**self.base_hf(cfg), **self.to_hf(cfg)}
        out = dict(cfg.hf_config)
        for k, v in self.to_hf(cfg).items():
            if k in out or (v not in (None, False) and not (k in CLASS_DEFAULTS and CLASS_DEFAULTS[k] == v)):
                out[k] = v
        return out

    @property
    def chat_formats(self) -> tuple:
        return tuple(t.name for t in self.tokenizers if t.chat)

    def is_tied_alias(self, cfg, key: str) -> bool:
        return bool(cfg.tie_word_embeddings) and key in self.tied_aliases


# ---------------------------------------------------------------- helpers shared by config.json readers
def eos_ids(d: dict) -> tuple:
    e = d.get("eos_token_id")
    if e is None:
        return ()
    return tuple(e) if isinstance(e, (list, tuple)) else (int(e),)


def eos_out(c):
    """eos_token_id as config.json writes it: an int, a list, or None."""
    if not c.eos_token_id:
        return None
    return list(c.eos_token_id) if len(c.eos_token_id) > 1 else c.eos_token_id[0]


def number(x):
    """1.0 -> 1, 2.5 -> 2.5 (config.json keeps integral ratios as ints)."""
    return int(x) if float(x).is_integer() else x


def auto_map_names(d: dict) -> str:
    """The text of a config.json's auto_map and architectures, for recognising remote-code families."""
    import json

    return json.dumps(d.get("auto_map") or {}) + " " + " ".join(d.get("architectures") or [])


def is_chatglm_remote(d: dict) -> bool:
    return "modeling_chatglm" in auto_map_names(d) or d.get("model_type") == "chatglm"


def need_int(d: dict, key: str, default=None) -> int:
    """An integer field of config.json (absent: default); a string or float where an int belongs is refused."""
    v = d.get(key, default)
    if v is None and default is None and key not in d:
        raise KeyError(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ConfigError(f"config.json field {key!r} must be an integer, got {v!r}")
    return v
