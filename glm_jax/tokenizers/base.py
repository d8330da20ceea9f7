"""Pieces shared by every GLM tokenizer: file checks, special-token splitting, padding, the base class."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np

CHAT_ROLES = ("system", "user", "assistant", "observation")


def read_tokenizer_config(folder: str) -> dict:
    """tokenizer_config.json of `folder` as a dict ({} when the file is absent)."""
    path = os.path.join(folder, "tokenizer_config.json")
    return read_json_object(path) if os.path.isfile(path) else {}


def read_json_object(path: str) -> dict:
    """A JSON file that must hold an object, with errors that name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a valid JSON file ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_sentencepiece(path: str):
    """A SentencePieceProcessor for `path`, with a clear error for a missing or garbage file."""
    import sentencepiece as spm

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: sentencepiece model file not found")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(path)
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{path}: not a valid sentencepiece model ({e})") from e
    if sp.vocab_size() <= 0:
        raise ValueError(f"{path}: sentencepiece model has no pieces")
    return sp


def sp_piece_id(sp, piece: str) -> int | None:
    """Id of a sentencepiece piece, None when the model does not have it."""
    pid = sp.piece_to_id(piece)
    return None if pid == sp.unk_id() and piece != sp.id_to_piece(pid) else pid


def special_pattern(tokens: Iterable[str]) -> re.Pattern | None:
    """Regex matching any of `tokens`, longest first (leftmost-longest like transformers' trie)."""
    tokens = sorted(set(tokens), key=len, reverse=True)
    return re.compile("|".join(re.escape(t) for t in tokens)) if tokens else None


def split_special(text: str, pattern: re.Pattern | None) -> list[tuple[str, bool]]:
    """Cut `text` at the special tokens: [(chunk, is_special), ...]; empty chunks are dropped."""
    if pattern is None:
        return [(text, False)] if text else []
    out, pos = [], 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            out.append((text[pos : m.start()], False))
        out.append((m.group(), True))
        pos = m.end()
    if pos < len(text):
        out.append((text[pos:], False))
    return out


def clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization (default on in transformers 4.30 decoding)."""
    for a, b in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(a, b)
    return text


def as_id_list(ids) -> list[int]:
    """Plain list of ints from a list, tuple, numpy or JAX array (a scalar becomes one id)."""
    arr = np.asarray(ids)
    if arr.ndim == 0:
        return [int(arr)]
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-D sequence of token ids, got shape {arr.shape}")
    return [int(i) for i in arr.tolist()]


def check_messages(messages: Sequence[dict]) -> list[dict]:
    """Validate chat messages: dicts with a known role and str/None content."""
    if isinstance(messages, dict) or not isinstance(messages, (list, tuple)):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"messages[{i}] must be a dict with a 'role' key, got {m!r}")
        if m["role"] not in CHAT_ROLES:
            raise ValueError(f"messages[{i}]: unknown role {m['role']!r}; expected one of {CHAT_ROLES}")
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            raise ValueError(f"messages[{i}]: content must be a string or None, got {type(content).__name__}")
    return list(messages)


def _rebuild(cls, init_args: dict):
    return cls(**init_args)


class GLMTokenizer:
    """Common interface. Subclasses set the attributes below and implement the `_`-hooks.
    Copies (copy/deepcopy, worker processes) rebuild the tokenizer from its constructor arguments."""

    chat_format: str = ""
    special_tokens: dict[str, int]  # name -> id
    eos_token_ids: list[int]  # ids that end a chat turn (what the family's chat() stops on)
    pad_token_id: int
    vocab_size: int  # number of ids, appended special tokens included
    prefix_ids: list[int] = []  # what encode(..., add_special_tokens=True) puts before the text
    suffix_ids: list[int] = []  # ... and after it

    _init_args: dict = {}  # constructor arguments, set by each subclass

    def __reduce__(self):
        return (_rebuild, (type(self), dict(self._init_args)))

    # ---- text <-> ids
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; with add_special_tokens the family's prefix/suffix tokens too."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = self._encode_text(text)
        return self.prefix_ids + ids + self.suffix_ids if add_special_tokens else ids

    def _encode_text(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        raise NotImplementedError

    def tokenize(self, text: str) -> list:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int:
        """Id of a special token name or vocabulary piece; ValueError when unknown."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        tid = self._piece_to_id(token)
        if tid is None:
            raise ValueError(f"{token!r} is not a token of this {self.chat_format} tokenizer")
        return tid

    def _piece_to_id(self, piece: str) -> int | None:
        return None

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids the family's chat() stops generating on."""
        return list(self.eos_token_ids)

    @property
    def stop_tokens(self) -> list[str]:
        """Names of the stop tokens."""
        by_id = {}
        for name, tid in self.special_tokens.items():
            by_id.setdefault(tid, name)
        return [by_id.get(i, str(i)) for i in self.eos_token_ids]

    def __len__(self) -> int:
        return self.vocab_size

    # ---- chat
    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kwargs) -> list[int]:
        raise NotImplementedError

    def parse_response(self, text: str, history=None) -> dict:
        raise NotImplementedError

    # ---- batches
    def pad(self, batch: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """Left-pad id lists to one length: input_ids, attention_mask (1 = real token), position_ids."""
        rows = [as_id_list(r) for r in batch]
        width = max((len(r) for r in rows), default=0)
        ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        pos = np.zeros((len(rows), width), dtype=np.int64)
        for b, r in enumerate(rows):
            start = width - len(r)
            ids[b, start:] = r
            mask[b, start:] = 1
            pos[b, start:] = np.arange(len(r))
        return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}

    def batch_encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """encode(text, add_special_tokens=True) for each text, then pad (like `tokenizer(texts, padding=True)`)."""
        return self.pad([self.encode(t, add_special_tokens=True) for t in texts])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(chat_format={self.chat_format!r}, vocab_size={self.vocab_size})"


class SentencePieceText:
    """Text <-> pieces and ids through the sentencepiece processor `self.sp`, for the tokenizers built on one
    (ChatGLM2/3, the original GLM's); put before GLMTokenizer in the bases."""

    def tokenize(self, text: str) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def _encode_text(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def _piece_to_id(self, piece: str) -> int | None:
        return sp_piece_id(self.sp, piece)
