"""Tokenizers for the data pipeline.

* 'bundled': a small sentencepiece (unigram, 8k) model trained on glm_jax/data/corpus, deterministic,
  cached under <cache_dir>/sentencepiece/<hash>.model. Its command tokens follow GLM:
  <pad>=0 <unk>=1 </s>=2 (eos) [CLS] [MASK] [sMASK] [gMASK] <sop> <eop> [dBLOCK].
* a path: handed to `glm_jax.tokenizers.load_tokenizer` (ChatGLM sentencepiece, GLM-4 tiktoken, ...);
  a bare sentencepiece .model file is loaded directly when that package is not available.
* any object with `.encode(text) -> list[int]` is used as is. Its special ids come from a
  `special_tokens` dict (name -> id) when it has one, else from `special_ids` overrides.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib

import numpy as np

from glm_jax.data.objectives import SpecialIds
from glm_jax.data.sources import bundled_files, default_cache_dir

BUNDLED_CONTROL = ("[CLS]", "[MASK]", "[sMASK]", "[gMASK]", "<sop>", "<eop>", "[dBLOCK]")
BUNDLED_OPTIONS = dict(
    model_type="unigram",
    vocab_size=8000,
    character_coverage=1.0,
    byte_fallback=True,
    pad_id=0,
    unk_id=1,
    bos_id=-1,
    eos_id=2,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    shuffle_input_sentence=False,
    num_threads=1,
    split_digits=True,
    max_sentence_length=100000,
    minloglevel=2,
)
# names under which tokenizers expose each GLM command token
ALIASES = {
    "eos": ("eos", "<eos>", "</s>", "<|endoftext|>", "eod"),
    "cls": ("cls", "[CLS]", "ENC", "<ENC>", "<cls>"),
    "mask": ("mask", "[MASK]", "MASK", "<mask>"),
    "smask": ("smask", "[sMASK]", "sMASK"),
    "gmask": ("gmask", "[gMASK]", "gMASK"),
    "sop": ("sop", "<sop>", "<|startofpiece|>"),
    "eop": ("eop", "<eop>", "<|endofpiece|>"),
    "dblock": ("dblock", "[dBLOCK]", "dBLOCK", "<dBLOCK>"),
}
SENTENCE_END_CHARS = (".", "?", "!", ";", ":", "\n", "。", "？", "！", "；", "…")


class SentencePieceTokenizer:
    """`.encode(text) -> list[int]`, `.decode(ids)`, `.special_tokens`, `.vocab_size`.
    Carries its model as bytes so that grain worker processes can rebuild it."""

    def __init__(self, model_proto: bytes, special_tokens: dict[str, int] | None = None):
        import sentencepiece as spm

        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        self.vocab_size = self.sp.get_piece_size()
        found = {p: self.sp.piece_to_id(p) for p in BUNDLED_CONTROL + ("</s>", "<pad>")}
        found = {p: i for p, i in found.items() if i != self.sp.unk_id()}
        self.special_tokens = {**found, **(special_tokens or {})}
        self.vocab_size = max([self.vocab_size] + [i + 1 for i in self.special_tokens.values()])
        self._names = {v: k for k, v in self.special_tokens.items()}

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        n = self.sp.get_piece_size()
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < n])

    def id_to_piece(self, i: int) -> str:
        if i in self._names or i >= self.sp.get_piece_size():
            return self._names.get(i, "")
        piece = self.sp.id_to_piece(int(i))
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:  # byte-fallback piece
            return bytes([int(piece[3:5], 16)]).decode("latin-1")
        return piece.replace("\u2581", " ")

    def __getstate__(self):
        return {"model_proto": self.model_proto, "special_tokens": self.special_tokens}

    def __setstate__(self, state):
        self.__init__(state["model_proto"], state["special_tokens"])


def train_bundled_sentencepiece(cache_dir=None, **overrides) -> pathlib.Path:
    """Trains (once) the bundled corpus' sentencepiece model; returns the cached .model path."""
    import sentencepiece as spm

    opts = {**BUNDLED_OPTIONS, **overrides}
    files = bundled_files()
    h = hashlib.sha256(b"iter-v2" + repr(sorted(opts.items())).encode() + repr(BUNDLED_CONTROL).encode())
    for f in files:
        h.update(f.name.encode() + f.read_bytes())
    path = default_cache_dir(cache_dir) / "sentencepiece" / f"bundled-{h.hexdigest()[:16]}.model"
    if not path.exists():
        buf = io.BytesIO()
        # Lines go in through an iterator, not as file names: the trainer records input file paths
        # in the model proto, which would make the bytes depend on where the checkout lives.
        lines = (line for f in files for line in f.read_text(encoding="utf-8").splitlines())
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines, model_writer=buf, control_symbols=list(BUNDLED_CONTROL), **opts
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)
    return path


def bundled_tokenizer(cache_dir=None) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(train_bundled_sentencepiece(cache_dir).read_bytes())


def _chatglm_style_sp(path: pathlib.Path) -> SentencePieceTokenizer:
    """A ChatGLM2/3 tokenizer.model without glm_jax.tokenizers: the command tokens are appended after
    the sentencepiece vocabulary in ChatGLM2's order ([MASK] [gMASK] [sMASK] sop eop)."""
    proto = path.read_bytes()
    tok = SentencePieceTokenizer(proto)
    n = tok.sp.get_piece_size()
    extra = {name: n + i for i, name in enumerate(("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"))}
    return SentencePieceTokenizer(proto, {**extra, "</s>": tok.sp.eos_id()})


def resolve_tokenizer(spec, cache_dir=None):
    if spec is None or (isinstance(spec, str) and spec == "bundled"):
        return bundled_tokenizer(cache_dir)
    if not isinstance(spec, (str, os.PathLike)):
        if not callable(getattr(spec, "encode", None)):
            raise ValueError(f"tokenizer must be 'bundled', a path or an object with .encode(text); got {spec!r}")
        return spec
    path = pathlib.Path(spec)
    try:
        from glm_jax.tokenizers import load_tokenizer  # another module of this package
    except ImportError:
        load_tokenizer = None
    if load_tokenizer is not None:
        return load_tokenizer(str(path))
    model = path / "tokenizer.model" if path.is_dir() else path
    if model.exists():
        return _chatglm_style_sp(model)
    raise ValueError(f"cannot load a tokenizer from {spec!r}: no glm_jax.tokenizers and no sentencepiece file")


def special_ids(tok, overrides: dict | None = None) -> SpecialIds:
    """GLM command-token ids of `tok`, looked up in `tok.special_tokens` under the usual names."""
    table = dict(getattr(tok, "special_tokens", None) or {})
    found = {}
    for key, names in ALIASES.items():
        for name in names:
            if name in table:
                found[key] = int(table[name])
                break
    # the tokenizer's own end-of-text id wins (ChatGLM-6B ends documents with <eop>)
    eos_ids = getattr(tok, "eos_token_ids", None)
    eos = eos_ids[0] if isinstance(eos_ids, (list, tuple)) and eos_ids else getattr(tok, "eos_token_id", None)
    if isinstance(eos, (int, np.integer)) and eos >= 0:
        found["eos"] = int(eos)
    found.update(overrides or {})
    if "eos" not in found:
        raise ValueError("the tokenizer has no end-of-document token; pass special_ids={'eos': ID}")
    return SpecialIds(**{k: found.get(k) for k in ("eos", "sop", "eop", "mask", "smask", "gmask", "cls", "dblock")})


def _token_text(tok, i: int) -> str:
    if hasattr(tok, "id_to_piece"):
        return tok.id_to_piece(i)
    try:
        return tok.decode([i])
    except Exception:
        return ""


def sentence_end_table(tok, ids: SpecialIds, vocab_size: int | None = None) -> np.ndarray:
    """is_end_V[id]: the token's text contains a sentence end (THUDM/GLM's sentence rule); command tokens are False."""
    v = vocab_size or getattr(tok, "vocab_size", 0) or 0
    v = int(v() if callable(v) else v)
    if not v:
        raise ValueError("cannot size the sentence-end table: the tokenizer has no vocab_size")
    table = np.zeros(v, bool)
    for i in range(v):
        text = _token_text(tok, i)
        table[i] = any(c in text for c in SENTENCE_END_CHARS)
    for i in (ids.eos, ids.cls, ids.sop, ids.eop, ids.mask, ids.smask, ids.gmask, ids.dblock):
        if i is not None and 0 <= i < v:
            table[i] = False
    return table
