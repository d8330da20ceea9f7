"""Which files of a checkpoint folder make up its tokenizer (and chat template), and copying them, each file
atomically, into another folder (a glm-train run, an export)."""

from __future__ import annotations

import os
import pathlib
import shutil

from glm_jax import storage

# every family's tokenizer files, the generation settings and the chat template files beside them
TOKENIZER_FILES = (
    "tokenizer.model",
    "ice_text.model",
    "glm_sentencepiece.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

TOKENIZER_PATTERNS = ("tokenization_*.py",)  # remote-code families' tokenizer classes


def tokenizer_files(folder) -> list[pathlib.Path]:
    """The tokenizer files present in `folder` (and, for remote-code families, their tokenization_*.py)."""
    folder = storage.as_path(folder)  # a local folder or a gs:// one
    if not folder.is_dir():
        return []
    out = [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]
    out += sorted(p for g in TOKENIZER_PATTERNS for p in folder.glob(g) if p.is_file())
    return out


def copy_tokenizer_files(src, dst) -> list[str]:
    """Copies the tokenizer files of `src` into `dst` (each written to a temporary name, then renamed)."""
    dst = pathlib.Path(dst)
    names = []
    for f in tokenizer_files(src):
        tmp = dst / f".{f.name}.{os.getpid()}.tmp"
        storage.copy(f, tmp) if storage.is_remote(f) else shutil.copyfile(f, tmp)
        os.replace(tmp, dst / f.name)
        names.append(f.name)
    return names
