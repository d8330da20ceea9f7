"""load_tokenizer: pick the tokenizer format from the files in a folder (the families' table) and build it."""

from __future__ import annotations

import fnmatch
import os
import pathlib

from glm_jax import families, storage
from glm_jax.families.base import TokenizerFormat
from glm_jax.tokenizers.base import GLMTokenizer, read_tokenizer_config

# Each family declares its tokenizers' formats (glm_jax/families/, `Family.tokenizers`): which files they read,
# how those are recognised and which class reads them. This module only reads that table.
_FORMATS = families.tokenizer_formats()
CHAT_FORMATS = tuple(sorted(name for name, t in _FORMATS.items() if t.chat))


def _infer_format(folder: str, cfg: dict, model_file: str | None) -> tuple[TokenizerFormat, str]:
    """The format of a folder's (or of a named file's) tokenizer, and the file it reads: the single best score."""
    formats = list(_FORMATS.values())
    if model_file:
        name = os.path.basename(model_file)
        candidates = [(t, model_file) for t in formats if name in t.files]
        if not candidates:
            known = ", ".join(dict.fromkeys(f for t in formats for f in t.files))
            raise ValueError(f"{model_file}: no tokenizer format reads a file of this name ({known}); pass chat_format")
    else:
        candidates = [
            (t, os.path.join(folder, t.files[0]))
            for t in formats
            if all(os.path.isfile(os.path.join(folder, f)) for f in t.files)
        ]
    scored = [(t.score(path, cfg), t, path) for t, path in candidates]
    best = max((s for s, _, _ in scored), default=0)
    if not best and model_file:
        why = "; ".join(dict.fromkeys(t.unfit for t, _ in candidates if t.unfit)) or "not recognised"
        raise ValueError(f"{model_file}: {why}; no chat format fits it")
    if not best:
        expected = list(dict.fromkeys(t.what or " + ".join(t.files) for t in formats))
        raise FileNotFoundError(
            f"{folder}: no tokenizer file found (expected {', '.join(expected[:-1])}, or {expected[-1]})"
        )
    top = [(t, path) for s, t, path in scored if s == best]
    if len(top) > 1:
        files = " and ".join(dict.fromkeys(os.path.basename(p) for _, p in top))
        raise ValueError(
            f"{model_file or folder}: {files} fits the chat formats {', '.join(t.name for t, _ in top)} alike and "
            f"tokenizer_config.json does not say which; pass chat_format=" + " or ".join(repr(t.name) for t, _ in top)
        )
    return top[0]


def _named_format(folder: str, model_file: str | None, chat_format: str) -> tuple[TokenizerFormat, str]:
    """The format the caller named, and the file it reads, checked against the files there."""
    if chat_format not in _FORMATS:
        raise ValueError(f"unknown chat_format {chat_format!r}; expected one of {tuple(sorted(_FORMATS))} or None")
    t = _FORMATS[chat_format]
    paths = [model_file] if model_file else [os.path.join(folder, f) for f in t.files]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: missing; chat_format={chat_format!r} needs {' + '.join(t.files)}")
    name = os.path.basename(paths[0])
    if name not in t.files and any(name in other.files for other in _FORMATS.values()):
        raise ValueError(
            f"{paths[0]}: the file {name} does not fit chat_format={chat_format!r}, which reads {t.files[0]}"
        )
    if not t.fits(paths[0]):
        raise ValueError(f"{paths[0]}: chat_format={chat_format!r} reads {t.kind}; this file does not fit it")
    return t, paths[0]


def _load_remote(url: str, chat_format, **kwargs) -> GLMTokenizer:
    """A gs:// tokenizer: its files are small, so they are copied into a temporary folder and loaded from there
    (every tokenizer reads its files whole when it is built); errors name the URL, not the copy."""
    import tempfile

    from glm_jax.tokenizers.files import TOKENIZER_FILES, TOKENIZER_PATTERNS
    from glm_jax.tokenizers.sentencepiece import MODEL_FILE

    url = url.rstrip("/")
    if not storage.exists(url):
        raise FileNotFoundError(f"{url}: tokenizer folder not found")
    folder, name = (url, None) if storage.isdir(url) else url.rsplit("/", 1)
    names = storage.listdir(folder)
    wanted = set(TOKENIZER_FILES) | {MODEL_FILE, "config.json"} | ({name} if name else set())
    picked = [n for n in names if n in wanted or any(fnmatch.fnmatch(n, g) for g in TOKENIZER_PATTERNS)]
    with tempfile.TemporaryDirectory(prefix="glm-tokenizer-") as tmp:
        storage.download_folder(folder, pathlib.Path(tmp), picked)
        try:
            return load_tokenizer(os.path.join(tmp, name) if name else tmp, chat_format, **kwargs)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(str(e).replace(tmp, folder)) from None


def load_tokenizer(path: str, chat_format: str | None = None, **kwargs) -> GLMTokenizer:
    """Tokenizer of a folder, or of a tokenizer file (its folder's tokenizer_config.json is read too).

    chat_format: "chatglm" (ChatGLM-6B), "chatglm2", "chatglm3", "glm4", "glm4_5" (GLM-4.5/4.6, the glm4-moe
    family: tokenizer.json, XML tool calls, <think> blocks, enable_thinking=False for /nothink), or None to infer
    it from the files (ChatGLM2 vs ChatGLM3 from tokenizer_config.json's name_or_path; glm4_5 from a
    tokenizer.json whose added tokens include <arg_key>; GLM-4.7's template variant from a chat_template that
    reads clear_thinking). "gpt2" loads a GPT-2-style BPE
    (vocab.json + merges.txt, original GLM; no chat template). Extra keyword arguments go to the class
    (e.g. num_image_tokens, encode_special_tokens, template_variant).
    """
    path = os.fspath(path)
    if storage.is_remote(path):
        return _load_remote(path, chat_format, **kwargs)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: tokenizer folder not found")
    model_file = None if os.path.isdir(path) else path
    folder = path if model_file is None else os.path.dirname(path) or "."
    cfg = read_tokenizer_config(folder)
    from glm_jax.tokenizers import sentencepiece as glm_sp

    if chat_format in (None, "sentencepiece") and (
        glm_sp.is_sentencepiece_folder(folder) or os.path.basename(model_file or "") == glm_sp.MODEL_FILE
    ):  # glm-train's bundled tokenizer, saved into a run folder
        return glm_sp.GLMSentencePieceTokenizer(model_file or os.path.join(folder, glm_sp.MODEL_FILE), **kwargs)
    if chat_format is None:
        fmt, vocab_file = _infer_format(folder, cfg, model_file)
    else:
        fmt, vocab_file = _named_format(folder, model_file, chat_format)
    return fmt.build(vocab_file, folder, cfg, **kwargs)
