"""Training data with bytes that are not UTF-8: decoded with replacement as Python's decoder replaces them, never
dropped (a whole file under doc_split=file, lines under doc_split=line), counted per file and reported by glm-train
one line a file."""

import io
import json
import pathlib
import tempfile
import types

from helpers import FIX

import glm_jax
from glm_jax import data
from glm_jax.data import sft
from glm_jax.data.sources import decode_doc, open_source
from train import data as train_data

CACHE = pathlib.Path(tempfile.gettempdir()) / "glm_jax_test_cache"
BASE = dict(seq_len=64, batch_size=2, seed=1, cache_dir=str(CACHE), shard_index=0, shard_count=1)
GOOD = "The river ran past the mill. Birds sang in the morning; the miller woke early! "


def _reference_docs(raw: bytes, split: str):
    """The documents as the split rule cuts the bytes, each decoded by Python with replacement."""
    pieces = {"file": [raw], "line": [p for p in raw.splitlines() if p.strip()]}[split]
    return [p.decode("utf-8", "replace") for p in pieces]


def _texts(src):
    return [decode_doc(src.raw(i), 10**6)[0] for i in range(len(src))]


def test_one_bad_byte_does_not_drop_a_file(tmp_path):
    """doc_split=file: the only file has one bad byte. It used to be skipped whole ("no usable documents")."""
    raw = (GOOD * 20).encode() + b"\xff" + (GOOD * 20).encode()
    path = tmp_path / "one.txt"
    path.write_bytes(raw)
    spec = {"files": [str(path)], "doc_split": "file", "data_dir": str(tmp_path / "tfds")}
    src = open_source(spec, CACHE)
    assert sorted(_texts(src)) == _reference_docs(raw, "file")
    assert src.invalid_utf8 == {str(path): 1}
    with data.make_pipeline(BASE, objective="causal", source=spec) as pipe:
        batch = next(pipe)
        stats = pipe.stats
    assert stats["docs_total"] == 1 and stats["docs_invalid_utf8_replaced"] == 1
    assert stats["docs_skipped_empty"] == stats["docs_skipped_malformed"] == 0
    assert batch["loss_mask"].sum() > 0
    assert pipe.invalid_utf8_files == {str(path): 1}


def test_lines_with_bad_bytes_are_kept_and_counted(tmp_path):
    lines = [
        GOOD.encode(),
        b"bad \xff here " + GOOD.encode(),
        b"two \xc3\x28 and \xe2\x82 " + GOOD.encode(),  # an invalid pair and a truncated character: 2
        b"   ",  # blank: not a document
        "caf\u00e9 \ufffd already replaced ".encode() + GOOD.encode(),  # a real U+FFFD is not counted
        GOOD.encode(),
    ]
    raw = b"\n".join(lines) + b"\n"
    bad = tmp_path / "bad.txt"
    bad.write_bytes(raw)
    clean = tmp_path / "clean.txt"
    clean.write_text(GOOD * 3 + "\n" + GOOD + "\n", encoding="utf-8")
    spec = {"files": [str(bad), str(clean)], "doc_split": "line", "data_dir": str(tmp_path / "tfds")}
    src = open_source(spec, CACHE)
    want = _reference_docs(raw, "line") + _reference_docs(clean.read_bytes(), "line")
    assert sorted(_texts(src)) == sorted(want) and len(want) == 7
    assert src.invalid_utf8 == {str(bad): 3}  # the clean file is not listed
    with data.make_pipeline(BASE, objective="causal", source=spec) as pipe:
        next(pipe)
        stats = pipe.stats
    assert stats["docs_total"] == 7 and stats["docs_invalid_utf8_replaced"] == 2
    assert stats["docs_skipped_empty"] == 0


def test_jsonl_text_with_bad_bytes(tmp_path):
    raw = json.dumps({"text": GOOD}).encode() + b"\n" + b'{"text": "bad \xff\xfe ' + GOOD.encode() + b'"}\n'
    path = tmp_path / "docs.jsonl"
    path.write_bytes(raw)
    src = open_source({"files": [str(path)], "data_dir": str(tmp_path / "tfds")}, CACHE)
    assert sorted(_texts(src)) == sorted([GOOD, "bad \ufffd\ufffd " + GOOD])
    assert src.invalid_utf8 == {str(path): 2}


def test_glm_train_reports_a_line_per_file(tmp_path):
    """train.data.make_batches (what glm-train builds its data with) prints one line per file with bad bytes."""
    a, b, c = (tmp_path / n for n in ("a.txt", "b.txt", "c.txt"))
    a.write_bytes((GOOD * 10).encode() + b"\x80\x81" + (GOOD * 10).encode())
    b.write_bytes((GOOD * 10).encode())
    c.write_bytes(b"\xfe" + (GOOD * 10).encode())
    source = {"files": [str(a), str(b), str(c)], "doc_split": "file", "data_dir": str(tmp_path / "tfds")}
    tc = types.SimpleNamespace(
        data={"source": source, "cache_dir": str(CACHE)}, objective="causal", seq_len=64, seed=0, batch_size=2
    )
    err = io.StringIO()
    pipe = train_data.make_batches(tc, 2, 0, 1, err=err)
    try:
        assert err.getvalue().splitlines() == [
            f"warning: data: {a}: 2 invalid UTF-8 byte sequence(s) replaced with U+FFFD (kept, not dropped)",
            f"warning: data: {c}: 1 invalid UTF-8 byte sequence(s) replaced with U+FFFD (kept, not dropped)",
        ]
        assert pipe.stats["docs_total"] == 3 and pipe.stats["docs_invalid_utf8_replaced"] == 2
    finally:
        pipe.close()
    # the eval pipeline and the other shards stay quiet: one report per run
    err = io.StringIO()
    train_data.make_batches(tc, 2, 0, 1, eval_split=True, err=err).close()
    train_data.make_batches(tc, 1, 1, 2, err=err).close()
    assert err.getvalue() == ""


def test_sft_lines_with_bad_bytes_are_kept_and_counted(tmp_path):
    tok = glm_jax.load_tokenizer(FIX / "chat-templates" / "chatglm2-6b", chat_format="chatglm2")
    rec = {"prompt": "hello", "response": "fine"}
    bad_line = b'{"prompt": "he\xffllo", "response": "fi\xc3ne"}'
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(rec).encode() + b"\n" + bad_line + b"\n")
    reader = sft.read_jsonl(path, tok, "ptuning_chatglm2")
    rows = list(reader)
    want = [
        sft.encode(tok, rec, "ptuning_chatglm2"),
        sft.encode(tok, json.loads(bad_line.decode("utf-8", "replace")), "ptuning_chatglm2"),
    ]
    assert rows == want and not reader.report.skipped
    assert reader.report.invalid_utf8 == {str(path): 2}
    assert f"{path}: 2 invalid UTF-8 byte sequence(s) replaced with U+FFFD" in reader.report.summary()
