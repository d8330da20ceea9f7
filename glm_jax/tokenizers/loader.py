"""load_tokenizer: pick the family from the files in a folder and build its tokenizer."""

from __future__ import annotations

import fnmatch
import os
import pathlib

from glm_jax import storage
from glm_jax.tokenizers.base import GLMTokenizer, read_tokenizer_config

CHAT_FORMATS = ("chatglm", "chatglm2", "chatglm3", "glm4", "glm4_5")
_FILES = {
    "chatglm": "ice_text.model",
    "chatglm2": "tokenizer.model",
    "chatglm3": "tokenizer.model",
    "glm4": "tokenizer.model",
    "glm4_5": "tokenizer.json",
}


def _infer_format(folder: str, cfg: dict, model_file: str | None) -> str:
    name = os.path.basename(model_file or "")
    if name in ("vocab.json", "merges.txt"):
        return "gpt2"
    if name == "ice_text.model" or (not model_file and os.path.isfile(os.path.join(folder, "ice_text.model"))):
        return "chatglm"
    if name == "tokenizer.json":
        return _infer_tokenizer_json(model_file, explicit=True)
    model = model_file or os.path.join(folder, "tokenizer.model")
    if os.path.isfile(model):
        from glm_jax.tokenizers.glm4 import is_tiktoken_file

        if is_tiktoken_file(model):
            return "glm4"
        name = " ".join(str(cfg.get(k, "")) for k in ("name_or_path", "_name_or_path")).lower()
        found = [f for f in ("chatglm3", "chatglm2") if f in name]
        if len(found) == 1:
            return found[0]
        raise ValueError(
            f"{model}: a sentencepiece tokenizer.model is used by both ChatGLM2 and ChatGLM3 and "
            f"tokenizer_config.json does not say which; pass chat_format='chatglm2' or 'chatglm3'"
        )
    hf_json = os.path.join(folder, "tokenizer.json")
    if not model_file and os.path.isfile(hf_json) and _infer_tokenizer_json(hf_json, explicit=False):
        return "glm4_5"
    if os.path.isfile(os.path.join(folder, "vocab.json")) and os.path.isfile(os.path.join(folder, "merges.txt")):
        return "gpt2"
    raise FileNotFoundError(
        f"{folder}: no tokenizer file found (expected ice_text.model, tokenizer.model, vocab.json + merges.txt, "
        "or a GLM-4.5 tokenizer.json)"
    )


def _infer_tokenizer_json(path: str, explicit: bool) -> str | None:
    """ "glm4_5" for GLM-4.5's tokenizer.json (tool-call tokens among its added tokens). Other tokenizer.json
    files (GLM-4-0414's...) have no glm-jax chat format: None, or an error when the file was named."""
    from glm_jax.tokenizers.glm45 import is_glm45_tokenizer_json

    if is_glm45_tokenizer_json(path):
        return "glm4_5"
    if explicit:
        raise ValueError(f"{path}: not a GLM-4.5 tokenizer.json (no <arg_key> added token); no chat format fits it")
    return None


def _glm4_special_ids(cfg: dict) -> dict[str, int] | None:
    added = cfg.get("added_tokens_decoder")
    if not isinstance(added, dict) or not added:
        return None
    try:
        return {str(v["content"]): int(k) for k, v in added.items()}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"tokenizer_config.json: malformed added_tokens_decoder ({e})") from e


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
        chat_format = _infer_format(folder, cfg, model_file)
    elif chat_format not in CHAT_FORMATS + ("gpt2",):
        raise ValueError(f"unknown chat_format {chat_format!r}; expected one of {CHAT_FORMATS} or None")
    if chat_format == "gpt2":
        from glm_jax.tokenizers.gpt2 import GPT2BPETokenizer

        return GPT2BPETokenizer.from_folder(folder, **kwargs)
    vocab_file = model_file or os.path.join(folder, _FILES[chat_format])
    if not os.path.isfile(vocab_file):
        raise FileNotFoundError(f"{vocab_file}: missing; chat_format={chat_format!r} needs {_FILES[chat_format]}")
    if chat_format == "glm4_5" or os.path.basename(vocab_file) == "tokenizer.json":
        if chat_format != "glm4_5":
            raise ValueError(f"{vocab_file}: a tokenizer.json does not fit chat_format={chat_format!r}")
        from glm_jax.tokenizers.glm45 import GLM45Tokenizer, template_variant_of

        opts = {
            "clean_up_tokenization_spaces": bool(cfg.get("clean_up_tokenization_spaces", False)),
            "template_variant": template_variant_of(folder, cfg),
        }
        return GLM45Tokenizer(vocab_file, **{**opts, **kwargs})
    if chat_format == "chatglm":
        from glm_jax.tokenizers.chatglm import ChatGLMTokenizer

        opts = {
            "num_image_tokens": cfg.get("num_image_tokens", 20000),  # 20000: the class default
            "remove_space": bool(cfg.get("remove_space", False)),
            "do_lower_case": bool(cfg.get("do_lower_case", False)),
        }
        return ChatGLMTokenizer(vocab_file, **{**opts, **kwargs})
    from glm_jax.tokenizers.glm4 import is_tiktoken_file

    tiktoken_file = is_tiktoken_file(vocab_file)
    if tiktoken_file != (chat_format == "glm4"):
        kind = "a tiktoken rank file" if tiktoken_file else "not a tiktoken rank file"
        raise ValueError(f"{vocab_file}: is {kind}, which does not fit chat_format={chat_format!r}")
    if chat_format == "glm4":
        from glm_jax.tokenizers.glm4 import GLM4Tokenizer

        return GLM4Tokenizer(vocab_file, **{"special_tokens": _glm4_special_ids(cfg), **kwargs})
    from glm_jax.tokenizers.chatglm2 import ChatGLM2Tokenizer, ChatGLM3Tokenizer

    if chat_format == "chatglm2":
        return ChatGLM2Tokenizer(vocab_file, **kwargs)
    opts = {"encode_special_tokens": bool(cfg.get("encode_special_tokens", False))}
    return ChatGLM3Tokenizer(vocab_file, **{**opts, **kwargs})
