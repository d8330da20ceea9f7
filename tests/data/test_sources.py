"""Sources (TFDS array_record builder, tfds.data_source) and bad-data handling with exact counts."""

import json
import pathlib
import sys
import tempfile

import numpy as np

from glm_jax import data
from glm_jax.data.sources import decode_doc, iter_documents, open_source

CACHE = pathlib.Path(tempfile.gettempdir()) / "glm_jax_test_cache"
BASE = dict(seq_len=128, batch_size=4, seed=3, cache_dir=str(CACHE), shard_index=0, shard_count=1)
GOOD = "The river ran past the mill. Birds sang in the morning; the miller woke early! "


def test_decode_doc_classifies_problems():
    assert decode_doc(b"fine text", 100) == ("fine text", None)
    # invalid UTF-8 is replaced as Python's own decoder replaces it, and the document kept
    assert decode_doc(b"bad \xff\xfe", 100) == (b"bad \xff\xfe".decode("utf-8", "replace"), "invalid_utf8")
    assert decode_doc(b" \xff\n\xfe ", 100) == (None, "empty")  # nothing but replaced bytes and whitespace
    assert decode_doc(b"  \n ", 100) == (None, "empty")
    assert decode_doc(None, 100) == (None, "malformed")
    assert decode_doc("x" * 150, 100) == ("x" * 100, "huge")
    # a multi-byte character cut by the byte clip of a huge document is not "invalid"
    text, problem = decode_doc(("\u00e9" * 300).encode(), 100)
    assert problem == "huge" and text == "\u00e9" * 100


def test_bad_documents_are_skipped_or_truncated_and_counted():
    docs = [
        GOOD * 3,
        "",
        "   \n",
        b"broken \xc3\x28 utf8",
        None,
        12345,
        {"no": "text"},
        GOOD * 200,  # huge: truncated at max_doc_chars
        "Hi",
        b"ok",  # fewer than min_doc_tokens tokens: skipped when met
        GOOD * 2,
        GOOD * 5,
    ]
    with data.make_pipeline(BASE, max_doc_chars=2000, min_doc_tokens=4, source=docs) as pipe:
        batches = [next(pipe) for _ in range(12)]
        stats = pipe.stats
    assert stats["docs_total"] == 12
    assert stats["docs_skipped_empty"] == 2
    assert stats["docs_invalid_utf8_replaced"] == 1  # kept, with U+FFFD
    assert stats["docs_skipped_malformed"] == 3
    assert stats["docs_truncated_huge"] == 1
    assert stats["docs_skipped_short"] >= 1
    assert stats["batches"] == 12 and stats["tokens_loss"] > 0
    for batch in batches:
        assert batch["tokens"].shape == (4, 128) and batch["loss_mask"].any()


def test_all_documents_bad_is_a_clear_error():
    try:
        data.make_pipeline(BASE, source=["", b"\xff", None])
    except ValueError as e:
        assert "no usable documents" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_local_jsonl_through_tfds_array_record(tmp_path):
    lines = [json.dumps({"text": GOOD * (i + 1)}) for i in range(6)]
    lines += ["{not json", json.dumps({"title": "no text key"}), json.dumps({"text": ""})]
    raw = ("\n".join(lines) + "\n").encode() + b'{"text": "bad \xff utf8"}\n'
    path = tmp_path / "docs.jsonl"
    path.write_bytes(raw)
    assert len(list(iter_documents(path))) == 10
    src_spec = {"files": [str(path)], "data_dir": str(tmp_path / "tfds"), "name": "unit_test_docs"}
    with data.make_pipeline(BASE, source=src_spec, segment_ids=True) as pipe:
        next(pipe)
        stats = pipe.stats
    assert stats["docs_total"] == 10
    assert stats["docs_skipped_empty"] == 3  # bad json, missing key and "" are all empty text
    assert stats["docs_invalid_utf8_replaced"] == 1
    assert pipe.invalid_utf8_files == {str(path): 1}
    record_files = list((tmp_path / "tfds").rglob("*.array_record*"))
    assert record_files, "the builder writes array_record files"
    # the prepared dataset is read back by its TFDS name, as any prepared TFDS dataset would be
    src = open_source({"tfds": "glm_local_text/unit_test_docs", "data_dir": str(tmp_path / "tfds")})
    texts = sorted(src.raw(i) for i in range(len(src)))
    assert len(texts) == 10 and (GOOD * 6).encode() in texts
    assert "tensorflow" not in sys.modules


def test_text_file_doc_splits(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("First para.\nstill first.\n\nSecond para.\n\n\nThird.\n")
    assert len(list(iter_documents(path, "text", "file"))) == 1
    assert len(list(iter_documents(path, "text", "paragraph"))) == 3
    assert len(list(iter_documents(path, "text", "line"))) == 4


def test_bundled_corpus_size_and_readme():
    files = data.bundled_files()
    total = sum(f.stat().st_size for f in files)
    assert 1_000_000 <= total <= 3_000_000 and len(files) >= 10
    readme = (files[0].parent / "README.md").read_text()
    assert "public domain" in readme.lower() and "shakespeare" in readme.lower()
    sizes = np.array([f.stat().st_size for f in files])
    assert (sizes > 50_000).all()


def test_family_tokenizers_from_a_path(fixtures_dir):
    """A tokenizer folder goes through glm_jax.tokenizers.load_tokenizer (ChatGLM2 sentencepiece, GLM-4 tiktoken)."""
    docs = [GOOD * (2 + i % 4) for i in range(20)]
    for family in ("chatglm2-6b", "glm-4-9b-chat"):
        path = fixtures_dir / "chat-templates" / family
        with data.make_pipeline(BASE, objective="chatglm_prefix", tokenizer=str(path), source=docs) as pipe:
            batch = next(pipe)
            st = pipe.tokenizer.special_tokens
        gmask, sop = st["[gMASK]"], st.get("sop", st.get("<sop>"))
        rows = np.arange(4)
        sep = batch["prefix_len"]
        assert (batch["tokens"][rows, sep - 1] == gmask).all() and (batch["tokens"][rows, sep] == sop).all()
        with data.make_pipeline(
            BASE, objective="blank_infilling", tokenizer=str(path), source=docs, block_mask_prob=0.0
        ) as pipe:
            batch = next(pipe)
        assert batch["loss_mask"].sum() > 0 and batch["tokens"].max() < pipe.tokenizer.vocab_size


class _ExplodingTokenizer:
    """Any object with .encode works; this one fails on one document, which must only be counted."""

    def __init__(self, inner):
        self.inner, self.special_tokens, self.vocab_size = inner, inner.special_tokens, inner.vocab_size

    def encode(self, text):
        if "EXPLODE" in text:
            raise RuntimeError("tokenizer failure")
        return self.inner.encode(text)

    def decode(self, ids):
        return self.inner.decode(ids)


def test_tokenizer_failure_on_a_document_is_counted_not_raised():
    tok = _ExplodingTokenizer(data.bundled_tokenizer(CACHE))
    docs = [GOOD * 3, "EXPLODE " + GOOD, GOOD * 4, GOOD * 2]
    with data.make_pipeline(BASE, tokenizer=tok, source=docs) as pipe:
        for _ in range(6):
            next(pipe)
        assert pipe.stats["docs_skipped_encode_error"] >= 1
