"""The registry of checkpoint families: one module each, listed once, here.

Each module defines `FAMILY`, a `glm_jax.families.base.Family` that says how its config.json is recognised, read
and written, its presets, key map, buffers, tied aliases and tokenizer formats. Adding a family means adding one
module and one entry to `_MODULES`: `GLMConfig.family`'s allowed values (`IDS`) and `load_tokenizer`'s formats
are read from here. Recognition asks the families in this order; the
first that says yes wins (the original GLM and transformers' Glm share model_type "glm", and ChatGLM2 must be
asked before ChatGLM-6B, whose remote-code names it shares).
"""

from __future__ import annotations

from glm_jax.errors import ConfigError
from glm_jax.families import chatglm, chatglm2, glm, glm4, glm4_moe, glm4_moe_lite, glm_hf, glm_moe_dsa
from glm_jax.families.base import Family
from glm_jax.families.rows import expand
from glm_jax.quant.rows import stored_rows

_MODULES = (glm, chatglm2, chatglm, glm4, glm4_moe, glm4_moe_lite, glm_moe_dsa, glm_hf)
_BY_ID = {m.FAMILY.id: m.FAMILY for m in _MODULES}
IDS = tuple(_BY_ID)


def get(family_id: str) -> Family:
    if family_id not in _BY_ID:
        raise ConfigError(f"unknown family {family_id!r}; expected one of {', '.join(IDS)}")
    return _BY_ID[family_id]


def detect(d: dict) -> Family:
    """The family whose config.json `d` is."""
    for m in _MODULES:
        if m.FAMILY.recognise(d):
            return m.FAMILY
    raise ConfigError(
        f"unrecognised config: model_type={d.get('model_type')!r}, "
        f"architectures={d.get('architectures')!r}; supported families: {', '.join(IDS)}"
    )


def tokenizer_formats() -> dict:
    """Every family's tokenizer formats, chat_format name -> TokenizerFormat, in registry order (families that
    ship the same format share one record)."""
    out = {}
    for m in _MODULES:
        for t in m.FAMILY.tokenizers:
            if out.setdefault(t.name, t) is not t:
                raise ConfigError(f"tokenizer format {t.name!r} is declared twice, differently ({m.FAMILY.id})")
    return out


def presets() -> dict:
    """Every family's released models: preset name -> the config.json the checkpoint ships with."""
    return {name: d for m in _MODULES for name, d in m.FAMILY.presets.items()}


def preset(name: str) -> dict:
    table = presets()
    if name not in table:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(table))}")
    return dict(table[name])


def keymap(cfg, layout: str | None = None) -> list:
    """Concrete key-map rows (layers expanded) for `cfg` in `layout`'s key names (default: the config's family)."""
    return stored_rows(expand(get(layout or cfg.family).rows, cfg), cfg)  # quantized linears: weight + scale
