"""glm-train `objective=dpo data.source=PATH` (DESIGN §3.12): batches of preference pairs.

Each record {"prompt", "chosen", "rejected"} of the .jsonl file(s) is rendered by the model's chat format
(glm_jax.data.preference.encode). A pair gives two rows, prompt + chosen and prompt + rejected, each laid out as
TRL 1.16's DataCollatorForPreference lays it out (right padding, keep_start truncation to seq_len), with the
next-token targets and the completion mask shifted by one: row position i predicts token i + 1, and carries loss
when that token is a completion token (TRL's `labels` and `shift_completion_mask`). The step puts the chosen rows
and the rejected rows on one batch axis and runs them in one forward (train/rl/dpo.py).

A batch holds `rows` pairs: {chosen,rejected}_{tokens,targets,mask}, each [rows, seq_len]. The order is a seeded
permutation that changes every epoch; the state (epoch, pair) resumes exactly. Each process takes its own rows of
every global batch (shard_index of shard_count). A bad record is skipped and counted with its file and line.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from train.config import TrainConfigError

DPO_DATA_KEYS = {"source", "tokenizer"}
BATCH_KEYS = tuple(f"{s}_{k}" for s in ("chosen", "rejected") for k in ("tokens", "targets", "mask"))


def _row(prompt_ids, ids, mask, T: int):
    """(tokens, targets, mask) [T] of prompt + completion, cut to T tokens (keep_start) and right-padded with 0
    (padding never carries loss, and a causal model's earlier positions never see it)."""
    full = (list(prompt_ids) + list(ids))[:T]
    cm = ([0] * len(prompt_ids) + list(mask))[: len(full)]
    tokens = np.zeros(T, np.int32)
    targets = np.zeros(T, np.int32)
    m = np.zeros(T, np.float32)
    tokens[: len(full)] = full
    targets[: len(full) - 1] = full[1:]
    m[: len(full) - 1] = cm[1:]
    return tokens, targets, m


class PreferenceBatches:
    """Iterator of numpy batch dicts (BATCH_KEYS, each [rows, seq_len]); get_state()/set_state(); `tokenizer`."""

    def __init__(self, source, tokenizer, seq_len, rows, seed=0, shard_index=0, shard_count=1):
        from glm_jax.data import preference
        from glm_jax.data.sft import _jsonl_files, jsonl_lines

        self.tokenizer, self.T, self.rows, self.seed = tokenizer, int(seq_len), int(rows), int(seed)
        self.shard_index, self.shard_count = int(shard_index), int(shard_count)
        self.pairs, self.skipped, self.cut = [], [], 0
        self.invalid_utf8: dict = {}
        for path, lineno, text in jsonl_lines(_jsonl_files(source), self.invalid_utf8):
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
                if not isinstance(rec, dict):
                    raise preference.PreferenceRecordError("expected a JSON object")
                p = preference.encode(tokenizer, rec)
            except (ValueError, TypeError) as e:  # json.JSONDecodeError and PreferenceRecordError are ValueErrors
                self.skipped.append(f"{path}:{lineno}: {str(e).splitlines()[0]}")
                continue
            longest = len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))
            self.cut += longest > self.T
            if len(p.prompt_ids) + 1 >= self.T:  # no completion token would be left to score
                self.skipped.append(f"{path}:{lineno}: the prompt alone fills seq_len {self.T}")
                continue
            self.pairs.append(p)
        if not self.pairs:
            raise ValueError(
                f"{source}: no usable preference record" + (f" ({self.skipped[0]})" if self.skipped else "")
            )
        self.epoch, self.pair = 0, 0

    def summary(self) -> str:
        s = f"{len(self.pairs)} pairs, {len(self.skipped)} skipped, {self.cut} cut to seq_len {self.T}"
        return s + "".join(f"\n  skipped {x}" for x in self.skipped[:10])

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "pair": self.pair, "seed": self.seed, "records": len(self.pairs)}

    def set_state(self, state: dict) -> None:
        if state.get("seed") != self.seed or state.get("records") != len(self.pairs):
            raise ValueError(
                "this data state was saved with other preference data or another seed "
                f"(saved {state.get('records')} records, seed {state.get('seed')}; now {len(self.pairs)}, {self.seed})"
            )
        self.epoch, self.pair = int(state["epoch"]), int(state["pair"])

    def __iter__(self):
        return self

    def _order(self, epoch):
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))

    def __next__(self) -> dict:
        """The global batch of rows * shard_count pairs is the next run of the epoch's order (wrapping into the
        next epoch); this process takes its rows."""
        n = self.rows * self.shard_count
        picks, epoch, at = [], self.epoch, self.pair
        while len(picks) < n:
            order = self._order(epoch)
            take = order[at : at + n - len(picks)]
            picks += list(take)
            at += len(take)
            if at >= len(order):
                epoch, at = epoch + 1, 0
        self.epoch, self.pair = epoch, at
        mine = picks[self.shard_index * self.rows : (self.shard_index + 1) * self.rows]
        out = {k: [] for k in BATCH_KEYS}
        for i in mine:
            p = self.pairs[i]
            for side, ids, mask in (
                ("chosen", p.chosen_ids, p.chosen_mask),
                ("rejected", p.rejected_ids, p.rejected_mask),
            ):
                t, y, m = _row(p.prompt_ids, ids, mask, self.T)
                out[f"{side}_tokens"].append(t)
                out[f"{side}_targets"].append(y)
                out[f"{side}_mask"].append(m)
        return {k: np.stack(v) for k, v in out.items()}


def make_dpo_batches(tc, rows: int, shard_index: int, shard_count: int, eval_split: bool = False, err=None):
    from train.sft_data import sft_tokenizer

    d = dict(tc.data)
    source = d.get("source")
    if not isinstance(source, str) or source in ("", "bundled"):
        raise TrainConfigError("objective=dpo needs data.source=<a .jsonl file or a folder of them>")
    tok = sft_tokenizer(tc)
    try:
        batches = PreferenceBatches(
            source, tok, tc.seq_len, rows, tc.seed + (1_000_003 if eval_split else 0), shard_index, shard_count
        )
    except (ValueError, OSError) as e:
        raise TrainConfigError(f"data.source: {e}") from None
    if shard_index == 0 and not eval_split:
        print(f"dpo data {source}: {batches.summary()}", file=err or sys.stdout, flush=True)
    return batches


def batch_shapes(tc) -> dict:
    """The global batch's abstract arrays (compile_only)."""
    import jax

    dt = {"tokens": np.int32, "targets": np.int32, "mask": np.float32}
    return {k: jax.ShapeDtypeStruct((tc.batch_size, tc.seq_len), dt[k.split("_", 1)[1]]) for k in BATCH_KEYS}
