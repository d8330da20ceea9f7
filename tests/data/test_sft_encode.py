"""SFT record encoding against the golden fixtures of THUDM's fine-tuning scripts, plus read_jsonl and pack."""

import functools
import json

import helpers
import numpy as np
import pytest

import glm_jax
from glm_jax.data import sft

FIXTURES = helpers.FIX
SFT_DIR = FIXTURES / "sft"
CHAT_FORMAT = {"chatglm-6b": "chatglm", "chatglm2-6b": "chatglm2", "chatglm3-6b": "chatglm3", "glm-4-9b-chat": "glm4"}


@functools.cache
def fixture(fmt: str) -> dict:
    with open(SFT_DIR / f"{fmt}.json", encoding="utf-8") as f:
        data = json.load(f)
    assert data["format"] == fmt
    return data


@functools.cache
def tokenizer(folder: str):
    return glm_jax.load_tokenizer(FIXTURES / "chat-templates" / folder, chat_format=CHAT_FORMAT[folder])


def tok_for(fmt: str):
    return tokenizer(fixture(fmt)["tokenizer"])


def _cases(key: str):
    return [
        pytest.param(fmt, i, id=f"{fmt}-{c['id']}")
        for fmt in sft.FORMATS
        for i, c in enumerate(fixture(fmt).get(key, []))
    ]


def test_formats_have_fixtures():
    assert sorted(sft.FORMATS) == sorted(p.stem for p in SFT_DIR.glob("*.json"))


@pytest.mark.parametrize("fmt,i", _cases("cases"))
def test_encode_matches_reference(fmt, i):
    case = fixture(fmt)["cases"][i]
    out = sft.encode(tok_for(fmt), case["example"], fmt)
    assert out is not None
    input_ids, labels = out
    assert input_ids == case["input_ids"]
    assert labels == case["labels"]


@pytest.mark.parametrize("fmt,i", _cases("skipped_examples"))
def test_dropped_records_give_none(fmt, i):
    assert sft.encode(tok_for(fmt), fixture(fmt)["skipped_examples"][i]["example"], fmt) is None


def test_encode_does_not_modify_the_record():
    case = fixture("glm4")["cases"][3]  # null tool property, dropped by process_message
    before = json.dumps(case["example"])
    sft.encode(tok_for("glm4"), case["example"], "glm4")
    assert json.dumps(case["example"]) == before


@pytest.mark.parametrize(
    "fmt,record,match",
    [
        ("chatglm3", {"conversations": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
        ("chatglm3", {"conversation": []}, "missing key 'conversations'"),
        ("chatglm3", {"conversations": [{"role": "user", "content": 3}]}, "'content' must be str"),
        ("chatglm3", {"conversations": [{"role": "tool", "name": "f"}]}, "missing key 'parameters'"),
        ("chatglm3", {"conversations": [{"role": "assistant", "content": "a", "loss": "no"}]}, "'loss'"),
        ("chatglm3", ["not", "an", "object"], "JSON object"),
        ("chatglm3_finetune_hf", {"conversations": [{"role": "tool", "name": "f", "parameters": {}}]}, "'tool'"),
        ("chatglm3_finetune_hf", {"tools": [], "conversations": []}, "'tools'"),
        ("glm4", {"messages": [{"role": "tool", "content": "x"}]}, "unknown role 'tool'"),
        ("glm4", {"messages": []}, "empty"),
        ("glm4", {"messages": [{"role": "system", "tools": [{"type": "python"}]}]}, "missing key 'function'"),
        (
            "glm4_combine",
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
            "no assistant message",
        ),
        ("glm4_combine", {"messages": [{"role": "user", "content": "hi", "tools": None}]}, "'tools' must be a list"),
        ("ptuning_chatglm", {"prompt": "hi"}, "missing key 'response'"),
        ("ptuning_chatglm", {"prompt": "hi", "response": "yo", "history": None}, "'history'"),
        ("ptuning_chatglm2", {"prompt": "hi", "response": "yo", "history": [["only one"]]}, r"history\[0\]"),
        ("ptuning_chatglm2", {"prompt": 5, "response": "yo"}, "'prompt' must be"),
    ],
)
def test_malformed_records_raise(fmt, record, match):
    with pytest.raises(sft.SFTRecordError, match=match):
        sft.encode(tok_for(fmt), record, fmt)


def test_ptuning_quirks():
    assert sft.encode(tok_for("ptuning_chatglm"), {"prompt": None, "response": "x"}, "ptuning_chatglm") is None
    tok2 = tok_for("ptuning_chatglm2")
    null_history = sft.encode(tok2, {"prompt": "hi", "response": "yo", "history": None}, "ptuning_chatglm2")
    assert null_history == sft.encode(tok2, {"prompt": "hi", "response": "yo"}, "ptuning_chatglm2")


def test_wrong_tokenizer_or_format():
    record = fixture("glm4")["cases"][0]["example"]
    with pytest.raises(ValueError, match="glm4 tokenizer"):
        sft.encode(tok_for("chatglm3"), record, "glm4")
    with pytest.raises(ValueError, match="unknown SFT format"):
        sft.encode(tok_for("glm4"), record, "glm5")


def test_truncate_counts():
    report = sft.SFTReport()
    ids, labels = sft.truncate([1, 2, 3, 4], [-100, 2, 3, 4], 3, report)
    assert (ids, labels, report.truncated) == ([1, 2, 3], [-100, 2, 3], 1)
    assert sft.truncate([1, 2], [-100, 2], 3, report) == ([1, 2], [-100, 2]) and report.truncated == 1


def test_truncate_keeps_whole_turns():
    """GLM-4, system + 2 turns (89 tokens, the fixture's THUDM ids): cut anywhere in the second turn, the row is the
    reference's encoding of the first turn alone (which ends on <|user|>); cut inside the first reply, no turn fits
    and the record is cut at max_len, counted mid-turn."""
    case = next(c for c in fixture("glm4")["cases"] if c["id"] == "system_multi_turn_en")
    tok, ids, labels = tok_for("glm4"), case["input_ids"], case["labels"]
    one_turn = sft.encode(tok, dict(case["example"], messages=case["example"]["messages"][:3]), "glm4")
    n1 = len(one_turn[0])
    assert 0 < n1 < len(ids)
    for max_len in (n1, n1 + 1, len(ids) - 1):
        report = sft.SFTReport()
        assert sft.truncate(ids, labels, max_len, report, sft.user_token(tok)) == one_turn
        assert (report.truncated, report.truncated_mid_turn) == (1, 0)
    report = sft.SFTReport()
    assert sft.truncate(ids, labels, n1 - 1, report, sft.user_token(tok)) == (ids[: n1 - 1], labels[: n1 - 1])
    assert (report.truncated, report.truncated_mid_turn) == (1, 1)


def test_read_jsonl_truncates_chat_records_to_whole_turns(tmp_path):
    """ChatGLM3, 3 turns (104 tokens): with max_len short of the third turn, read_jsonl keeps two whole turns: the
    reference ids up to the <|user|> that opens the third, with the reference labels (that <|user|> labelled, as
    the token after a trained reply)."""
    case = next(c for c in fixture("chatglm3")["cases"] if c["id"] == "system_multi_turn_en")
    tok = tok_for("chatglm3")
    user = sft.user_token(tok)
    third = [i for i, t in enumerate(case["input_ids"]) if t == user][2]
    (tmp_path / "a.jsonl").write_text(json.dumps(case["example"]) + "\n")
    reader = sft.read_jsonl(tmp_path / "a.jsonl", tok, "chatglm3", max_len=len(case["input_ids"]) - 3)
    [(ids, labels)] = list(reader)
    assert ids == case["input_ids"][: third + 1] and labels == case["labels"][: third + 1]
    assert labels[-1] == user
    assert (reader.report.truncated, reader.report.truncated_mid_turn) == (1, 0)


def test_read_jsonl_skips_and_reports(tmp_path):
    cases = fixture("chatglm3")["cases"]
    lines = [
        json.dumps(cases[0]["example"]),  # 1 good
        '{"conversations": [{"role": "user", "content": "hi"}',  # 2 invalid JSON
        "",  # 3 blank, ignored
        json.dumps({"conversations": [{"role": "robot", "content": "beep"}]}),  # 4 unknown role
        json.dumps(cases[1]["example"], ensure_ascii=False),
    ]  # 5 good
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    reader = sft.read_jsonl(path, tok_for("chatglm3"), "chatglm3")
    rows = list(reader)
    assert rows == [(cases[0]["input_ids"], cases[0]["labels"]), (cases[1]["input_ids"], cases[1]["labels"])]
    rep = reader.report
    assert rep.records == 2 and rep.truncated == 0
    assert [(p, n) for p, n, _ in rep.skipped] == [(str(path), 2), (str(path), 4)]
    assert "invalid JSON" in rep.skipped[0][2] and "unknown role 'robot'" in rep.skipped[1][2]
    assert f"{path}:4:" in rep.summary()

    # a folder: its .jsonl files in name order, truncation counted
    (tmp_path / "b.jsonl").write_text(json.dumps(cases[2]["example"]) + "\n", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("not read", encoding="utf-8")
    reader = sft.read_jsonl(tmp_path, tok_for("chatglm3"), "chatglm3", max_len=10)
    rows = list(reader)
    assert len(rows) == 3 and all(len(i) == len(l) <= 10 for i, l in rows)
    assert rows[2] == (cases[2]["input_ids"][:10], cases[2]["labels"][:10])
    assert reader.report.truncated == 3 and len(reader.report.skipped) == 2


def test_read_jsonl_counts_dropped(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi", "response": ""}\n{"prompt": "hi", "response": "yo"}\n', encoding="utf-8")
    reader = sft.read_jsonl(path, tok_for("ptuning_chatglm2"), "ptuning_chatglm2")
    assert len(list(reader)) == 1 and reader.report.dropped == 1 and not reader.report.skipped


def _all_examples():
    out = []
    for fmt in sft.FORMATS:
        out += [(c["input_ids"], c["labels"]) for c in fixture(fmt)["cases"]]
    return out


def test_pack_matches_per_conversation_shift():
    examples = _all_examples()
    seq_len = max(len(i) for i, _ in examples) + 7
    batch = sft.pack(examples, seq_len)
    R = batch["tokens"].shape[0]
    assert all(a.shape == (R, seq_len) for a in batch.values())
    assert len(examples) > R  # several conversations share rows
    assert batch["loss_mask"].dtype == np.float32 and batch["tokens"].dtype == np.int32

    # walk each row's segments; every conversation appears whole, in one row, in input order within the row
    found = []
    for r in range(R):
        seg = batch["segment_ids"][r]
        n_seg = int(seg.max())
        assert np.all(seg[np.argmax(seg == 0) :] == 0) or seg.min() > 0  # padding only at the end
        for s in range(1, n_seg + 1):
            idx = np.flatnonzero(seg == s)
            assert idx.size and np.all(np.diff(idx) == 1)
            found.append((r, int(idx[0]), int(idx[-1]) + 1))
    assert len(found) == len(examples)
    spans = {}
    for r, a, b in found:
        ids = batch["tokens"][r, a:b].tolist()
        match = [k for k, (i, _) in enumerate(examples) if i == ids and k not in spans]
        assert match, "a packed span is not one whole conversation"
        spans[match[0]] = (r, a, b)
    for k, (ids, labels) in enumerate(examples):
        r, a, b = spans[k]
        nxt = np.array(labels[1:] + [-100])
        want_mask = (nxt != -100).astype(np.float32)
        np.testing.assert_array_equal(batch["targets"][r, a:b], np.where(nxt != -100, nxt, 0))
        np.testing.assert_array_equal(batch["loss_mask"][r, a:b], want_mask)
        np.testing.assert_array_equal(batch["position_ids"][r, a:b], np.arange(len(ids)))
    pad = batch["segment_ids"] == 0
    assert not batch["tokens"][pad].any() and not batch["loss_mask"][pad].any()
    assert not batch["position_ids"][pad].any()
    assert batch["loss_mask"].sum() == sum(sum(v != -100 for v in lab[1:]) for _, lab in examples)


def test_pack_first_fit_and_limits():
    ex = [([1] * 6, [-100] * 6), ([2] * 5, [-100] * 5), ([3] * 4, [-100, 3, 3, 3]), ([4] * 2, [-100, 4])]
    batch = sft.pack(ex, 10)
    # 6 -> row 0; 5 -> row 1; 4 fits row 0 (6 + 4); 2 fits row 1 (5 + 2)
    np.testing.assert_array_equal(batch["tokens"], [[1] * 6 + [3] * 4, [2] * 5 + [4] * 2 + [0] * 3])
    np.testing.assert_array_equal(batch["segment_ids"], [[1] * 6 + [2] * 4, [1] * 5 + [2] * 2 + [0] * 3])
    np.testing.assert_array_equal(batch["targets"][0, 6:], [3, 3, 3, 0])
    np.testing.assert_array_equal(batch["targets"][1, 5:7], [4, 0])
    with pytest.raises(ValueError, match="truncate it first"):
        sft.pack([([1] * 11, [-100] * 11)], 10)
    assert sft.pack([], 8)["tokens"].shape == (0, 8)
