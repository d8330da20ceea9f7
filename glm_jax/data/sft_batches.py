"""Batches for glm-train `objective=sft`: conversations of .jsonl files (DESIGN §3.5), encoded by `sft.encode`,
cut to seq_len (counted), packed several to a row with segment ids and positions restarting per conversation
(`sft.pack`: no token attends across conversations), in a seeded order that changes every epoch.

The whole state is (epoch, row): a resumed run sees the rows it would have seen. Each process takes its own
`rows` rows of every global batch (shard_index of shard_count), so all processes together read each packed row
once per epoch. A bad record (invalid JSON, unknown role, wrong types) is skipped and listed with its file and
line number in `report` (an SFTReport), never a crash.
"""

from __future__ import annotations

import numpy as np

from glm_jax.data import sft


class SFTBatches:
    """Iterator of numpy batch dicts {tokens, targets, loss_mask, segment_ids, position_ids}, each [rows, seq_len];
    get_state()/set_state() for checkpoints; `tokenizer`, `report`."""

    def __init__(
        self,
        source,
        tokenizer,
        format: str,
        seq_len: int,
        rows: int,
        seed: int = 0,
        shard_index: int = 0,
        shard_count: int = 1,
        packing: bool = True,
    ):
        self.tokenizer, self.seq_len, self.rows, self.seed = tokenizer, int(seq_len), int(rows), int(seed)
        self.shard_index, self.shard_count, self.packing = int(shard_index), int(shard_count), bool(packing)
        reader = sft.read_jsonl(source, tokenizer, format, max_len=self.seq_len)
        read = list(reader)
        self.examples = [ex for ex in read if any(t != sft.IGNORE for t in ex[1][1:])]
        self.report = reader.report
        self.report.dropped += len(read) - len(self.examples)  # nothing left to learn after the cut
        if not self.examples:
            raise ValueError(f"{source}: no usable {format} record ({self.report.summary().splitlines()[0]})")
        self.epoch, self.row = 0, 0
        self._packed = None

    # ------------------------------------------------------------ state
    def get_state(self) -> dict:
        return {"epoch": self.epoch, "row": self.row, "seed": self.seed, "records": len(self.examples)}

    def set_state(self, state: dict) -> None:
        if state.get("seed") != self.seed or state.get("records") != len(self.examples):
            raise ValueError(
                "this data state was saved with other SFT data or another seed "
                f"(saved {state.get('records')} records, seed {state.get('seed')}; now {len(self.examples)}, "
                f"{self.seed})"
            )
        self.epoch, self.row, self._packed = int(state["epoch"]), int(state["row"]), None

    # ------------------------------------------------------------ rows
    def epoch_rows(self, epoch: int) -> dict:
        """Every packed row of one epoch: the conversations in a seeded order, then packed (or one a row)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        exs = [self.examples[i] for i in order]
        if self.packing:
            return sft.pack(exs, self.seq_len)
        rows = [sft.pack([ex], self.seq_len) for ex in exs]
        return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}

    def _epoch(self) -> dict:
        if self._packed is None or self._packed[0] != self.epoch:
            self._packed = (self.epoch, self.epoch_rows(self.epoch))
        return self._packed[1]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        """The next global batch's rows of this process: global rows [row, row + rows * shard_count), of which
        this process takes its block; an epoch's last, partial batch wraps into the next epoch."""
        need = self.rows * self.shard_count
        parts, got = [], 0
        while got < need:
            data = self._epoch()
            n = len(data["tokens"])
            take = min(need - got, n - self.row)
            parts.append({k: v[self.row : self.row + take] for k, v in data.items()})
            got += take
            self.row += take
            if self.row >= n:
                self.epoch, self.row = self.epoch + 1, 0
        batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        lo = self.shard_index * self.rows
        return {k: v[lo : lo + self.rows] for k, v in batch.items()}
