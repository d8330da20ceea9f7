"""Supervised fine-tuning records -> (input_ids, labels), as THUDM's fine-tuning scripts build them.

    from glm_jax.data import sft
    ids, labels = sft.encode(tok, record, "glm4_combine")     # None for a record the reference drops
    reader = sft.read_jsonl("train.jsonl", tok, "chatglm3", max_len=2048)
    rows = list(reader); reader.report                          # SFTReport: records, skipped, truncated
    batch = sft.pack(rows, seq_len=2048)

`labels` follow the Hugging Face convention: same length as `input_ids`, -100 where no loss is taken, not
shifted. The multi-turn formats give every token the loss flag of its message and move the flags one place
right (labels[i] = input_ids[i] when the token before i is flagged): a trained message's own role token is
labelled only when the message before it is trained, and the token after a trained message is labelled.

Formats (record; ids; loss flags):
  chatglm3              ChatGLM3 finetune_chatmodel_demo. {"tools"?, "conversations"}; roles system, user,
                        assistant, observation, tool ({"name", "parameters", "observation"?}). [gMASK] sop, per
                        message <|role|> sp(metadata + "\\n") sp(content), eos. "tools" becomes a first system
                        message; a tool message becomes an assistant call (name as metadata, a ```python block
                        tool_call(k=<Python literal>, ...)) and an observation (JSON unless a string). Flag: the
                        message's "loss" (default true); false for system, user and a tool's observation half.
  chatglm3_finetune_hf  ChatGLM3 finetune_demo/finetune_hf.py. {"conversations"}, no tools. Flag: true except
                        for system and user; "loss" and "metadata" ignored.
  glm4                  GLM-4 finetune_demo, combine false. {"messages"}, tools on the system message (null
                        properties dropped, tools elsewhere deleted). [gMASK] <sop>, each message rendered alone
                        by the chat template, <|user|> as end of chat. Flag: false for system, user, observation.
  glm4_combine          combine true: the conversation rendered at once, flag on every token after the last
                        <|assistant|>, <|user|> appended.
  ptuning_chatglm       ChatGLM-6B ptuning/main.py. {"prompt", "response", "history"?}: prompt ids, [gMASK] <sop>,
                        response ids, <eop>, labels from <sop> on. A "history" key wraps the prompt in
                        "[Round i]\\n问：..\\n答：..\\n" rounds from 0.
  ptuning_chatglm2      ChatGLM2-6B ptuning/main.py: [gMASK] sop + build_prompt ids, response ids, eos; labels
                        on the response and eos.
The ptuning formats drop a record with an empty or null prompt or response (encode returns None) and turn a
label equal to the pad id into -100.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from glm_jax.data.sft_formats import FORMATS, IGNORE, ROLES, SFTRecordError, encode, tool_call_code, user_token
from glm_jax.inputs import decode_text

CHAT_FORMATS = ("chatglm3", "chatglm3_finetune_hf", "glm4", "glm4_combine")  # turns opened by <|user|>

__all__ = [
    "FORMATS",
    "IGNORE",
    "ROLES",
    "SFTRecordError",
    "SFTReport",
    "encode",
    "pack",
    "read_jsonl",
    "tool_call_code",
    "truncate",
    "user_token",
]


@dataclasses.dataclass
class SFTReport:
    """What read_jsonl saw: records yielded, lines skipped (file, line number, reason), records the reference
    drops (empty prompt/response), records cut to max_len, and per file the invalid UTF-8 byte sequences replaced
    with U+FFFD (such lines are kept). Blank lines are ignored and not counted."""

    records: int = 0
    skipped: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)
    dropped: int = 0
    truncated: int = 0  # records cut to max_len, at a turn boundary or not
    truncated_mid_turn: int = 0  # of those, the ones no turn boundary could keep (cut at max_len tokens)
    invalid_utf8: dict[str, int] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        head = (
            f"{self.records} records, {len(self.skipped)} skipped, {self.dropped} dropped, {self.truncated} truncated"
            f" ({self.truncated - self.truncated_mid_turn} to whole turns, {self.truncated_mid_turn} mid-turn)"
        )
        bad = [
            f"{path}: {n} invalid UTF-8 byte sequence(s) replaced with U+FFFD" for path, n in self.invalid_utf8.items()
        ]
        return "\n".join([head] + bad + [f"{path}:{line}: {reason}" for path, line, reason in self.skipped])


def truncate(
    input_ids: Sequence[int],
    labels: Sequence[int],
    max_len: int,
    report: SFTReport | None = None,
    turn_token: int | None = None,
):
    """Both lists cut to at most max_len tokens, labels aligned; report.truncated counts the records that were cut.

    With `turn_token` (the id of <|user|>, which opens every turn of the chat formats) whole turns are kept where
    possible: the cut falls just after the last <|user|> that fits, so the row ends as a complete conversation of
    those formats does (GLM-4's end of chat is <|user|>, and its label closes the last kept reply), and no reply
    is cut in half. When no such cut keeps a labelled token (the first turn alone is too long, or glm4_combine's
    single trained reply is at the end), the record is cut at max_len tokens, as THUDM's scripts do, and counted
    in report.truncated_mid_turn."""
    if max_len is None or len(input_ids) <= max_len:
        return list(input_ids), list(labels)
    if max_len < 1:
        raise ValueError(f"max_len must be positive, got {max_len}")
    ends = []
    if turn_token is not None:
        ends = np.flatnonzero(np.asarray(input_ids[:max_len]) == turn_token) + 1  # keep the <|user|> itself
        trained = np.cumsum(np.asarray(labels[:max_len]) != IGNORE)
        ends = [int(e) for e in ends if trained[e - 1] > 0]
    cut = ends[-1] if ends else max_len
    if report is not None:
        report.truncated += 1
        report.truncated_mid_turn += not ends
    return list(input_ids[:cut]), list(labels[:cut])


def _jsonl_files(path) -> list[str]:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    files = (
        sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".jsonl"))
        if os.path.isdir(path)
        else [path]
    )
    if not files:
        raise FileNotFoundError(f"{path}: no .jsonl files in this folder")
    return files


_ERROR_KIND = {json.JSONDecodeError: "invalid JSON: "}


def jsonl_lines(files, invalid_utf8: dict) -> Iterator[tuple[str, int, str]]:
    """(file, line number, text) of every non-blank line of the files; invalid UTF-8 is replaced with U+FFFD and
    counted per file in `invalid_utf8`."""
    for path in files:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                text, bad = decode_text(raw)
                if bad:
                    invalid_utf8[path] = invalid_utf8.get(path, 0) + bad
                yield path, lineno, text


class SFTReader:
    """Iterator over (input_ids, labels) of read_jsonl; `report` fills in while it is consumed."""

    def __init__(self, path, tok, format: str, max_len: int | None = None, report: SFTReport | None = None):
        if format not in FORMATS:
            raise ValueError(f"unknown SFT format {format!r}; expected one of {FORMATS}")
        self.files = _jsonl_files(path)
        self.report = report if report is not None else SFTReport()
        self._it = self._rows(tok, format, max_len)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def _rows(self, tok, format, max_len) -> Iterator[tuple[list[int], list[int]]]:
        rep = self.report
        turn = user_token(tok) if format in CHAT_FORMATS else None
        for path, lineno, text in jsonl_lines(self.files, rep.invalid_utf8):
            try:
                out = encode(tok, json.loads(text), format)
            except (json.JSONDecodeError, SFTRecordError) as e:
                kind = _ERROR_KIND.get(type(e), "")
                rep.skipped.append((path, lineno, f"{kind}{e}"))
                continue
            if out is None:
                rep.dropped += 1
                continue
            rep.records += 1
            yield truncate(*out, max_len, rep, turn) if max_len is not None else out


def read_jsonl(path_or_dir, tok, format: str, max_len: int | None = None, report: SFTReport | None = None) -> SFTReader:
    """(input_ids, labels) of every record of a .jsonl file, or of the .jsonl files of a folder (name order).
    Bad lines (invalid JSON, SFTRecordError) are skipped and listed in `.report.skipped` as (file, line number,
    reason); invalid UTF-8 is replaced with U+FFFD and counted per file in `.report.invalid_utf8`; with max_len
    every record is cut by truncate() (to whole turns where possible in the chat formats)."""
    return SFTReader(path_or_dir, tok, format, max_len, report)


def pack(examples: Iterable[tuple[Sequence[int], Sequence[int]]], seq_len: int) -> dict[str, np.ndarray]:
    """Pack conversations into rows of seq_len, greedy first-fit in order: each conversation goes whole into
    the first row with room for it, else into a new row. No conversation is split; a longer one than seq_len
    is a ValueError (cut it first with truncate / read_jsonl(max_len=)); empty ones are skipped.

    Arrays, R rows, T = seq_len:
      tokens       int32 [R, T]    input ids, 0 on padding
      targets      int32 [R, T]    targets[t] = labels[t + 1] of the same conversation (the output at t predicts
                                   it; never shift again); 0 at a conversation's last token, on -100 labels and
                                   on padding
      loss_mask    float32 [R, T]  1 where targets[t] is a real label, else 0
      segment_ids  int32 [R, T]    1, 2, 3, ... for the conversations of a row in order, 0 on padding
      position_ids int32 [R, T]    0, 1, 2, ... restarting at each conversation, 0 on padding
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    rows: list[list[tuple[list[int], list[int]]]] = []
    used: list[int] = []  # tokens taken in each row
    for n, (ids, labels) in enumerate(examples):
        ids, labels = [int(t) for t in ids], [int(t) for t in labels]
        if len(ids) != len(labels):
            raise ValueError(f"example {n}: {len(ids)} input ids but {len(labels)} labels")
        if not ids:
            continue
        if len(ids) > seq_len:
            raise ValueError(f"example {n}: {len(ids)} tokens do not fit seq_len {seq_len}; truncate it first")
        r = next((r for r, u in enumerate(used) if u + len(ids) <= seq_len), len(rows))
        if r == len(rows):
            rows.append([])
            used.append(0)
        rows[r].append((ids, labels))
        used[r] += len(ids)
    out = {
        k: np.zeros((len(rows), seq_len), np.float32 if k == "loss_mask" else np.int32)
        for k in ("tokens", "targets", "loss_mask", "segment_ids", "position_ids")
    }
    for r, convs in enumerate(rows):
        start = 0
        for s, (ids, labels) in enumerate(convs, 1):
            at = (r, slice(start, start + len(ids)))
            nxt = np.asarray(labels[1:] + [IGNORE], np.int64)
            out["tokens"][at], out["segment_ids"][at], out["position_ids"][at] = ids, s, np.arange(len(ids))
            out["targets"][at], out["loss_mask"][at] = np.where(nxt != IGNORE, nxt, 0), nxt != IGNORE
            start += len(ids)
    return out
