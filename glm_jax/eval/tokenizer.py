"""One tokenizer interface for evaluation: a checkpoint's own GLM tokenizer, or a local Hugging Face tokenizer.

`glm_jax.load_tokenizer` reads the GLM families' formats (ice_text.model, tokenizer.model as sentencepiece or
tiktoken ranks, vocab.json + merges.txt). Checkpoints of the transformers families (GlmForCausalLM,
Glm4ForCausalLM) ship a `tokenizer.json` instead: that folder is read with transformers.AutoTokenizer from the
local files only (no hub, no remote code), and encoded exactly as lm-eval's `hf` backend encodes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

BACKENDS = ("auto", "glm", "hf")


class EvalTokenizer:
    """encode/decode/chat for the evaluation tools. `kind` is "glm" (glm_jax tokenizer) or "hf" (transformers).

    prefix_ids: what a text starts with when special tokens are added (the GLM family's prefix, e.g.
    [gMASK] <sop>; for an HF tokenizer its BOS, when it adds one) and what conditions the first token of a
    rolling window / an empty context."""

    def __init__(self, path, backend: str = "auto", chat_format: str | None = None, fallback_eos: int | None = None):
        path = os.fspath(path)
        if backend not in BACKENDS:
            raise ValueError(f"tokenizer backend {backend!r} is not one of {BACKENDS}")
        self.path = path
        self._chat: dict[str, list[int]] = {}  # chat prompt strings we produced -> their exact ids
        self.tok = self.hf = None
        err = None
        if backend in ("auto", "glm"):
            try:
                from glm_jax.tokenizers import load_tokenizer

                self.tok = load_tokenizer(path, chat_format=chat_format)
            except FileNotFoundError as e:
                err = e
                if backend == "glm":
                    raise
        if self.tok is None:
            self.hf = _load_hf(path, err)
        self.kind = "glm" if self.tok is not None else "hf"
        if self.kind == "glm":
            eos = list(self.tok.eos_token_ids) or ([fallback_eos] if fallback_eos is not None else [])
            if not eos:
                raise ValueError(f"{path}: the tokenizer has no end-of-text token and config.json names no eos")
            self.eot_token_id = int(eos[0])
            self.prefix_ids = list(self.tok.prefix_ids) or [self.eot_token_id]
            self.pad_token_id = int(self.tok.pad_token_id)
        else:
            eos = self.hf.eos_token_id if self.hf.eos_token_id is not None else fallback_eos
            if eos is None:
                raise ValueError(f"{path}: tokenizer_config.json names no eos_token and config.json no eos_token_id")
            self.eot_token_id = int(eos)
            bos = self.hf.bos_token_id
            self.prefix_ids = [int(bos if bos is not None else eos)]  # HFLM's prefix_token_id
            self.pad_token_id = int(self.hf.pad_token_id if self.hf.pad_token_id is not None else eos)

    @property
    def name(self) -> str:
        return os.path.abspath(self.path).replace("/", "__")

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """Token ids. None: the default of each backend — for HF, lm-eval's HFLM.tok_encode rule (the tokenizer's
        own default, off when the text already starts with the prefix token); for GLM, prefix_ids + text.
        A chat prompt made by apply_chat_template encodes back to the ids it was made from."""
        if add_special_tokens is None and text in self._chat:
            return list(self._chat[text])
        if self.kind == "hf":
            kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
            if add_special_tokens is None and text.startswith(self.hf.decode(self.prefix_ids[0])):
                kw["add_special_tokens"] = False
            return list(self.hf.encode(text, **kw))
        ids = self.tok.encode(text)
        return ids if add_special_tokens is False else list(self.tok.prefix_ids) + ids

    def chat_ids(self, text: str) -> list[int] | None:
        """The exact ids of a chat prompt this tokenizer produced, else None."""
        ids = self._chat.get(text)
        return None if ids is None else list(ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "hf":
            return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat prompt as a string. HF: the tokenizer's Jinja template, as HFLM renders it. GLM: the family's
        own template; the string is its decoded ids and encode() maps it back to exactly those ids."""
        if self.kind == "hf":
            if not getattr(self.hf, "chat_template", None):
                raise ValueError(f"{self.path}: tokenizer_config.json has no chat_template")
            return self.hf.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=not add_generation_prompt,
            )
        ids = list(self.tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt))
        text = self.tok.decode(ids)
        self._chat[text] = ids
        return text

    def chat_template(self) -> str:
        """The template text (HF) or the GLM chat format's name, for lm-eval's cache fingerprint."""
        if self.kind == "hf":
            return getattr(self.hf, "chat_template", None) or ""
        return f"glm-jax:{self.tok.chat_format}"


def _load_hf(path: str, why: Exception | None):
    has_hf = any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
    if not has_hf:
        raise FileNotFoundError(f"{path}: no tokenizer found ({why or 'no tokenizer.json / tokenizer_config.json'})")
    try:
        import transformers
    except ImportError as e:
        raise FileNotFoundError(
            f"{path}: holds a Hugging Face tokenizer (tokenizer.json), which needs the transformers package"
        ) from e
    try:
        return transformers.AutoTokenizer.from_pretrained(
            path, local_files_only=True, trust_remote_code=False, use_fast=True
        )
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: cannot read the Hugging Face tokenizer files ({e})") from e
