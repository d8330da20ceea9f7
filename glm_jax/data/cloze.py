"""Cloze classification records -> fixed-shape batches for GLM's verbaliser finetuning (glm-train objective=cloze).

    from glm_jax.data import cloze
    data = cloze.ClozeBatches("train.jsonl", tok, seq_len=128, rows=8, verbalizer={"yes": "yes", "no": "no"})
    data.report.summary()                     # records, skipped lines with file:line and reason
    batch = next(data)                        # cloze_batch arrays [rows, C, seq_len] + labels [rows]

Records (one JSON object a line; a folder: its .jsonl files in name order):
  {"text": "... [MASK] ...", "label": L}                   L a key of `verbalizer` (label -> candidate text);
                                                            the candidates are the verbaliser's texts, in order
  {"text": "... [MASK] ...", "candidates": [...], "label": i}   own candidate texts, i the right one's index
The text holds one [MASK]: Part A is [prefix] left [MASK] right, each candidate is generated after <sop> and
scored with its <eop> (glm_jax/eval/cloze.py, THUDM/GLM's GLMForMultiTokenCloze). Every batch has the same
[rows, C, seq_len] shape (C: the verbaliser's size, or the most candidates of any record; shorter lists are
padded with candidates that score -inf), so a train step compiles once. A bad line (invalid JSON, no or several
[MASK], a label the verbaliser does not have, a row longer than seq_len) is skipped and listed with its file
and line number in `report`; a record without candidates when no verbaliser is given is a ValueError.
"""

from __future__ import annotations

import dataclasses
import inspect
import json

import numpy as np

from glm_jax.data.sft import _jsonl_files, jsonl_lines

BLANK = "[MASK]"


class ClozeRecordError(ValueError):
    """A record that cannot be used (skipped and reported, never a crash)."""


@dataclasses.dataclass
class ClozeReport:
    """What the reader saw: records kept, lines skipped (file, line number, reason), invalid UTF-8 per file."""

    records: int = 0
    skipped: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)
    invalid_utf8: dict[str, int] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        head = f"{self.records} records, {len(self.skipped)} skipped"
        bad = [f"{p}: {n} invalid UTF-8 byte sequence(s) replaced with U+FFFD" for p, n in self.invalid_utf8.items()]
        return "\n".join([head] + bad + [f"{path}:{line}: {reason}" for path, line, reason in self.skipped])


def check_verbalizer(verbalizer) -> dict[str, str] | None:
    """{label: candidate text} with string labels, or None; ValueError for a malformed one."""
    if verbalizer is None:
        return None
    if not isinstance(verbalizer, dict) or len(verbalizer) < 2:
        raise ValueError(f"verbalizer must map at least two labels to candidate texts, got {verbalizer!r}")
    out = {}
    for k, v in verbalizer.items():
        if isinstance(k, bool) or isinstance(v, bool):
            raise ValueError(
                f"verbalizer {verbalizer!r}: YAML reads unquoted yes/no/true/false as booleans; quote the labels "
                'and texts, e.g. {"yes": "yes", "no": "no"}'
            )
        if not isinstance(k, (str, int)) or not isinstance(v, str) or not v:
            raise ValueError(f"verbalizer: label {k!r} must map to a non-empty candidate text, got {v!r}")
        if str(k) in out:
            raise ValueError(f"verbalizer: label {k!r} appears twice")
        out[str(k)] = v
    return out


def _encoder(tok):
    """text -> ids without the tokenizer's own special tokens."""
    if "add_special_tokens" in inspect.signature(tok.encode).parameters:
        return lambda text: list(tok.encode(text, add_special_tokens=False))
    return lambda text: list(tok.encode(text))


def encode_record(record, encode, prefix, verbalizer, cand_ids) -> tuple[list[int], list[list[int]], list[int], int]:
    """(left ids, candidate ids, right ids, label index) of one record; ClozeRecordError when unusable."""
    if not isinstance(record, dict):
        raise ClozeRecordError(f"expected a JSON object, got {type(record).__name__}")
    text = record.get("text")
    if not isinstance(text, str):
        raise ClozeRecordError(f'"text" must be a string, got {text!r}')
    if text.count(BLANK) != 1:
        raise ClozeRecordError(f'"text" must hold {BLANK} exactly once, found {text.count(BLANK)}')
    label = record.get("label")
    if "candidates" in record:
        cands = record["candidates"]
        if not isinstance(cands, list) or len(cands) < 2 or not all(isinstance(c, str) and c for c in cands):
            raise ClozeRecordError(f'"candidates" must be a list of at least two non-empty strings, got {cands!r}')
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(cands):
            raise ClozeRecordError(f'"label" must be a candidate index 0..{len(cands) - 1}, got {label!r}')
        ids, index = [encode(c) for c in cands], label
    else:
        if verbalizer is None:
            raise ValueError('a record without "candidates" needs a verbalizer {label: candidate text, ...}')
        if isinstance(label, bool) or not isinstance(label, (str, int)) or str(label) not in verbalizer:
            raise ClozeRecordError(f"label {label!r} is not in the verbalizer ({', '.join(verbalizer)})")
        ids, index = cand_ids, list(verbalizer).index(str(label))
    if any(not c for c in ids):
        raise ClozeRecordError("a candidate encodes to no tokens")
    left_text, right_text = text.split(BLANK)
    left = list(prefix) + (encode(left_text) if left_text else [])
    right = encode(right_text) if right_text else []
    return left, ids, right, index


def read_jsonl(path, tok, prefix, verbalizer=None, max_len: int | None = None, report: ClozeReport | None = None):
    """[(left, candidates, right, label index)] of every usable record; bad lines go to `report.skipped`."""
    rep = report if report is not None else ClozeReport()
    encode = _encoder(tok)
    cand_ids = [encode(v) for v in verbalizer.values()] if verbalizer else None
    out = []
    for file, lineno, text in jsonl_lines(_jsonl_files(path), rep.invalid_utf8):
        try:
            ex = encode_record(json.loads(text), encode, prefix, verbalizer, cand_ids)
            longest = len(ex[0]) + len(ex[2]) + 2 + max(len(c) for c in ex[1])  # Part A, <sop>, candidate
            if max_len is not None and longest > max_len:
                raise ClozeRecordError(f"{longest} tokens (Part A + <sop> + candidate) exceed seq_len {max_len}")
        except json.JSONDecodeError as e:
            rep.skipped.append((file, lineno, f"invalid JSON: {e}"))
            continue
        except ClozeRecordError as e:
            rep.skipped.append((file, lineno, str(e)))
            continue
        except ValueError as e:
            raise ValueError(f"{file}:{lineno}: {e}") from None
        rep.records += 1
        out.append(ex)
    return out, rep


class ClozeBatches:
    """Iterator of numpy batch dicts: glm_jax.eval.cloze.cloze_batch's arrays [rows, C, seq_len] (position_ids
    [rows, C, 2, seq_len]), `labels` int32 [rows] and `length_penalty` float32 [rows]; the examples in a seeded
    order that changes every epoch. get_state()/set_state() for checkpoints; `tokenizer`, `report`, `num_choices`.
    Each process takes its own `rows` rows of every global batch (shard_index of shard_count)."""

    def __init__(
        self,
        source,
        tokenizer,
        seq_len: int,
        rows: int,
        *,
        ids,
        verbalizer=None,
        seed: int = 0,
        shard_index: int = 0,
        shard_count: int = 1,
        include_eop: bool = True,
        length_penalty: float = 0.0,
        prefix=None,
    ):
        from glm_jax.eval.cloze import cloze_batch

        self.tokenizer, self.seq_len, self.rows, self.seed = tokenizer, int(seq_len), int(rows), int(seed)
        self.shard_index, self.shard_count = int(shard_index), int(shard_count)
        self.verbalizer = check_verbalizer(verbalizer)
        if prefix is None:
            prefix = getattr(tokenizer, "prefix_ids", None) or ([ids.cls] if ids.cls is not None else [])
        examples, self.report = read_jsonl(source, tokenizer, list(prefix), self.verbalizer, self.seq_len)
        if not examples:
            raise ValueError(f"{source}: no usable cloze record ({self.report.summary().splitlines()[0]})")
        self.num_choices = max([len(self.verbalizer or ())] + [len(e[1]) for e in examples])
        self.data = cloze_batch(
            [e[:3] for e in examples],
            mask_id=ids.mask,
            sop_id=ids.sop,
            eop_id=ids.eop,
            include_eop=include_eop,
            length=self.seq_len,
            num_choices=self.num_choices,
        )
        self.data["labels"] = np.asarray([e[3] for e in examples], np.int32)
        self.data["length_penalty"] = np.full(len(examples), length_penalty, np.float32)
        self.epoch, self.row = 0, 0

    def __len__(self) -> int:
        return len(self.data["labels"])

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "row": self.row, "seed": self.seed, "records": len(self)}

    def set_state(self, state: dict) -> None:
        if state.get("seed") != self.seed or state.get("records") != len(self):
            raise ValueError(
                "this data state was saved with other cloze data or another seed "
                f"(saved {state.get('records')} records, seed {state.get('seed')}; now {len(self)}, {self.seed})"
            )
        self.epoch, self.row = int(state["epoch"]), int(state["row"])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        """The next global batch's rows of this process; an epoch's last, partial batch wraps into the next."""
        need, idx = self.rows * self.shard_count, []
        while len(idx) < need:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self))
            take = min(need - len(idx), len(self) - self.row)
            idx.extend(order[self.row : self.row + take].tolist())
            self.row += take
            if self.row >= len(self):
                self.epoch, self.row = self.epoch + 1, 0
        mine = np.asarray(idx[self.shard_index * self.rows : (self.shard_index + 1) * self.rows])
        return {k: v[mine] for k, v in self.data.items()}
