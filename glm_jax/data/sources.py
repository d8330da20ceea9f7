"""Document sources: a TFDS builder that writes local text/jsonl files as array_record, and readers
for any prepared TFDS dataset through `tfds.data_source` (random access, no TensorFlow needed).

Source specs accepted by `open_source`:
  'bundled'                                   the public-domain corpus in glm_jax/data/corpus/
  'PATH' or 'gs://bucket/path'                a text/jsonl file, or a folder of *.txt / *.jsonl files: as
                                              {'files': [...]} with the defaults below
  {'files': [paths], 'format': 'auto'|'text'|'jsonl', 'doc_split': 'file'|'paragraph'|'line',
   'text_key': 'text', 'name': optional, 'data_dir': optional}
                                              local files -> built once with GlmLocalText (array_record)
  {'tfds': 'name[/config][:version]', 'data_dir': dir, 'split': 'train', 'text_key': 'text'}
                                              any already-prepared TFDS dataset (array_record format)
  a sequence of str/bytes/dicts               used as is (tests, small in-memory corpora)
Documents stay raw bytes until the pipeline decodes them. Invalid UTF-8 is decoded with replacement (U+FFFD), never
dropped: documents with replacements are counted (docs_invalid_utf8_replaced), and for local files the replaced
byte sequences are counted per file (`DocSource.invalid_utf8`, reported by glm-train one line a file).
Files may be gs:// URLs (glm_jax/storage.py): they are read once into the local array_record build, which then
serves random access; each process still reads only its own shard of the samples (glm_jax/data/pipeline.py).
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from glm_jax import storage
from glm_jax.inputs import decode_text

CORPUS_DIR = pathlib.Path(__file__).parent / "corpus"
SCAN_STATS = (
    "docs_total",
    "docs_skipped_empty",
    "docs_invalid_utf8_replaced",
    "docs_truncated_huge",
    "docs_skipped_malformed",
)


def bundled_files() -> list[pathlib.Path]:
    return sorted(CORPUS_DIR.glob("*.txt"))


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    path = cache_dir or os.environ.get("GLM_JAX_CACHE") or pathlib.Path.home() / ".cache" / "glm_jax"
    return pathlib.Path(path)


# ----------------------------------------------------------------------------- TFDS builder


def _builder_class():
    """Defined lazily so that importing glm_jax.data does not import tensorflow_datasets."""
    import tensorflow_datasets as tfds

    @dataclasses.dataclass
    class GlmLocalTextConfig(tfds.core.BuilderConfig):
        paths: tuple = ()
        format: str = "auto"
        doc_split: str = "file"
        text_key: str = "text"

    class GlmLocalText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Local .txt / .jsonl files as one 'train' split of raw-text documents (array_record)."""

        name = "glm_local_text"
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description="Local text documents for glm_jax pretraining.",
                features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            cfg = self.builder_config
            for fi, path in enumerate(cfg.paths):
                for di, doc in enumerate(iter_documents(path, cfg.format, cfg.doc_split, cfg.text_key)):
                    yield f"{fi}:{di}", {"text": doc}

    return GlmLocalText, GlmLocalTextConfig


def iter_documents(path, fmt: str = "auto", doc_split: str = "file", text_key: str = "text"):
    """Raw bytes of each document in a local file. A jsonl line that is not a JSON object with a string
    `text_key` yields b'' (counted later as an empty document). Invalid UTF-8 is passed through (decode_doc
    replaces it); text files split on ASCII newlines, so a bad byte never takes its neighbours with it."""
    raw = storage.read_bytes(path)
    if fmt == "auto":
        fmt = "jsonl" if str(path).endswith((".jsonl", ".json")) else "text"
    if fmt == "jsonl":
        for line in raw.splitlines():
            if not line.strip():
                continue
            try:
                obj = json.loads(line.decode("utf-8", "surrogateescape"))
                text = obj[text_key]
                yield text.encode("utf-8", "surrogateescape") if isinstance(text, str) else b""
            except (ValueError, KeyError, TypeError):
                yield b""
    elif fmt == "text":
        if doc_split == "file":
            yield raw
        elif doc_split == "paragraph":
            yield from (p for p in re.split(rb"\n\s*\n", raw) if p.strip())
        elif doc_split == "line":
            yield from (p for p in raw.splitlines() if p.strip())
        else:
            raise ValueError(f"doc_split must be 'file', 'paragraph' or 'line', got {doc_split!r}")
    else:
        raise ValueError(f"format must be 'auto', 'text' or 'jsonl', got {fmt!r}")


def build_local_text(
    paths: Sequence,
    data_dir,
    *,
    name: str | None = None,
    format: str = "auto",
    doc_split: str = "file",
    text_key: str = "text",
) -> str:
    """Writes `paths` as TFDS dataset 'glm_local_text/<name>' (array_record) under data_dir, once.
    Returns the TFDS name to pass to `tfds.data_source(name, data_dir=data_dir)`."""
    import tensorflow_datasets as tfds

    paths = tuple(str(p) if storage.is_remote(p) else str(pathlib.Path(p).resolve()) for p in paths)
    if not paths:
        raise ValueError("build_local_text needs at least one file")
    if name is None:
        h = hashlib.sha256(json.dumps([format, doc_split, text_key]).encode())
        for p in paths:
            h.update(p.encode() + b"\0")
            h.update(hashlib.sha256(storage.read_bytes(p)).digest())
        name = "d" + h.hexdigest()[:16]
    builder_cls, config_cls = _builder_class()
    cfg = config_cls(name=name, paths=paths, format=format, doc_split=doc_split, text_key=text_key)
    tfds.display_progress_bar(False)
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # "Using custom data configuration ..." is expected here
    try:
        builder = builder_cls(config=cfg, data_dir=str(data_dir), file_format="array_record")
        builder.download_and_prepare()
    finally:
        absl_log.setLevel(level)
    return f"glm_local_text/{name}"


# ----------------------------------------------------------------------------- readers


class DocSource:
    """Random access to raw documents: `len(src)`, `src.raw(i) -> bytes | str | None`. `invalid_utf8`: for a
    source built from local files, {file: invalid UTF-8 byte sequences replaced}, for the files that have any."""

    def __init__(self, records, text_key: str = "text", fingerprint: str | None = None):
        self.records, self.text_key, self.fingerprint = records, text_key, fingerprint
        self.invalid_utf8: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.records)

    def raw(self, i: int):
        rec = self.records[int(i)]
        if isinstance(rec, dict):
            rec = rec.get(self.text_key)
        if isinstance(rec, np.ndarray) and rec.shape == ():
            rec = rec.item()
        return rec if isinstance(rec, (bytes, str)) else None


def count_invalid_utf8(paths: Iterable) -> dict[str, int]:
    """{path: invalid UTF-8 byte sequences that decoding with replacement turns into U+FFFD} for the files that
    have any (a file's sequences are those of its documents: documents split on ASCII bytes)."""
    out = {}
    for p in paths:
        n = decode_text(storage.read_bytes(p))[1]
        if n:
            out[str(p)] = n
    return out


def open_source(spec: Any, cache_dir=None) -> DocSource:
    cache = default_cache_dir(cache_dir)
    invalid = {}
    if isinstance(spec, str) and spec == "bundled":
        spec = {"files": [str(p) for p in bundled_files()], "doc_split": "file", "name": None}
    elif isinstance(spec, os.PathLike) or (isinstance(spec, str) and spec):
        spec = {"files": data_files(spec)}
    if isinstance(spec, dict) and "files" in spec:
        data_dir = pathlib.Path(spec.get("data_dir") or cache / "tfds")
        name = build_local_text(
            spec["files"],
            data_dir,
            name=spec.get("name"),
            format=spec.get("format", "auto"),
            doc_split=spec.get("doc_split", "file"),
            text_key=spec.get("text_key", "text"),
        )
        invalid = count_invalid_utf8(spec["files"])
        spec = {"tfds": name, "data_dir": str(data_dir), "split": "train", "text_key": "text"}
    if isinstance(spec, dict) and "tfds" in spec:
        import tensorflow_datasets as tfds

        split = spec.get("split", "train")
        ds = tfds.data_source(spec["tfds"], split=split, data_dir=spec.get("data_dir"))
        fp = json.dumps([spec["tfds"], str(spec.get("data_dir")), split, len(ds)])
        src = DocSource(ds, spec.get("text_key", "text"), fingerprint=fp)
        src.invalid_utf8 = invalid
        return src
    if isinstance(spec, DocSource):
        return spec
    if isinstance(spec, Sequence) and not isinstance(spec, (str, bytes)):
        return DocSource(spec)
    raise ValueError(f"cannot open data source {spec!r}; see glm_jax.data.sources for the accepted specs")


def data_files(path) -> list[str]:
    """A data file, or the *.txt / *.jsonl / *.json files of a folder (sorted); local or gs://."""
    p = storage.as_path(path)
    if storage.isdir(p):
        files = [str(p / n) for n in storage.listdir(p) if n.endswith((".txt", ".jsonl", ".json"))]
        if not files:
            raise ValueError(f"{path}: no .txt, .jsonl or .json file in this folder")
        return files
    if not storage.exists(p):
        raise FileNotFoundError(f"{path}: no such file or folder")
    return [str(p) if storage.is_remote(path) else os.fspath(path)]


def decode_doc(raw, max_chars: int) -> tuple[str | None, str | None]:
    """(text, problem): problem is None, 'malformed', 'empty' (no text: None), or for a kept document 'huge' (text
    truncated to max_chars), 'invalid_utf8' (invalid UTF-8 replaced with U+FFFD) or 'huge+invalid_utf8'.
    A document of nothing but whitespace and replaced bytes is 'empty'."""
    if raw is None:
        return None, "malformed"
    replaced = False
    if isinstance(raw, bytes):
        limit = 4 * max_chars + 4
        clipped = len(raw) > limit
        chunk = raw[:limit] if clipped else raw
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError:  # replace; a multi-byte character cut by the clip is held back, not replaced
            text = codecs.getincrementaldecoder("utf-8")("replace").decode(chunk, final=not clipped)
            replaced = text.count("\ufffd") > chunk.count(b"\xef\xbf\xbd")
    else:  # a str may hold surrogate-escaped bytes
        text, n = decode_text(raw)
        replaced = n > 0
    if not (text.replace("\ufffd", "") if replaced else text).strip():
        return None, "empty"
    problems = (["huge"] if len(text) > max_chars else []) + (["invalid_utf8"] if replaced else [])
    return text[:max_chars], "+".join(problems) or None


def scan_lengths(source: DocSource, max_doc_chars: int, cache_dir=None) -> tuple[np.ndarray, dict]:
    """Usable character length of every document (0 = skipped) and the bad-data counts, cached on
    disk (npz/json, no pickle) for TFDS sources."""
    path = None
    if source.fingerprint is not None:
        key = hashlib.sha256(f"{source.fingerprint}|{max_doc_chars}|v2".encode()).hexdigest()[:20]
        path = default_cache_dir(cache_dir) / "scan" / f"{key}.npz"
        if path.exists():
            with np.load(path, allow_pickle=False) as z:
                return z["chars"], json.loads(str(z["stats"]))
    chars = np.zeros(len(source), np.int64)
    stats = dict.fromkeys(SCAN_STATS, 0)
    stats["docs_total"] = len(source)
    for i in range(len(source)):
        text, problem = decode_doc(source.raw(i), max_doc_chars)
        for p in (problem or "").split("+"):
            if p == "huge":
                stats["docs_truncated_huge"] += 1
            elif p == "invalid_utf8":
                stats["docs_invalid_utf8_replaced"] += 1
            elif p:
                stats[f"docs_skipped_{p}"] += 1
        chars[i] = 0 if text is None else len(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, chars=chars, stats=np.array(json.dumps(stats)))
        os.replace(tmp, path)
    return chars, stats
