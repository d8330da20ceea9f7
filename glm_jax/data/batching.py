"""Rows -> fixed-shape numpy batches, and the attention rule the model applies to them.

Batch (B rows per process, T = seq_len; rows right-padded with 0 like the reference `pad_batch`):
  tokens       int32 [B, T]      model input ids
  targets      int32 [B, T]      already aligned: the output at t predicts targets[t] (never shift)
  loss_mask    float32 [B, T]    1 on trained positions (Part B / causal targets), 0 elsewhere and on pads
  position_ids int32 [B, 2, T]   channel 0 positions, channel 1 block positions (GLM / ChatGLM 2-D)
               int32 [B, T]      causal objective, or blank infilling with block_position=False
  prefix_len   int32 [B]         GLM's sep: keys < prefix_len are visible to every query (0 = causal)
  segment_ids  int32 [B, T]      only with segment_ids=True: 1-based document of each token, 0 on pads
  mode         int32 [B]         index into objectives.MODES (token, sentence, document, causal, prefix)
The dense [T, T] mask is never built on the host; `attention_mask` builds it where it is used
(pass xp=jax.numpy inside a jitted step).
"""

from __future__ import annotations

import numpy as np


def collate(rows: list[dict], seq_len: int, *, two_d: bool, segment_ids: bool) -> dict[str, np.ndarray]:
    B, T = len(rows), seq_len
    tokens_BT = np.zeros((B, T), np.int32)
    targets_BT = np.zeros((B, T), np.int32)
    loss_BT = np.zeros((B, T), np.float32)
    pos = np.zeros((B, 2, T) if two_d else (B, T), np.int32)
    prefix_B = np.zeros(B, np.int32)
    mode_B = np.zeros(B, np.int32)
    seg_BT = np.zeros((B, T), np.int32)
    for b, row in enumerate(rows):
        L = len(row["tokens"])
        if L > T:
            raise AssertionError(f"row of length {L} exceeds seq_len {T}")  # objectives fit rows to T
        tokens_BT[b, :L] = row["tokens"]
        targets_BT[b, :L] = row["targets"]
        loss_BT[b, :L] = row["loss_mask"]
        if two_d:
            pos[b, 0, :L] = row["position_ids"]
            pos[b, 1, :L] = row["block_position_ids"]
        else:
            pos[b, :L] = row["position_ids"]
        prefix_B[b] = row["sep"]
        mode_B[b] = row["mode"]
        seg_BT[b, :L] = row["seg"]
    out = {
        "tokens": tokens_BT,
        "targets": targets_BT,
        "loss_mask": loss_BT,
        "position_ids": pos,
        "prefix_len": prefix_B,
        "mode": mode_B,
    }
    if segment_ids:
        out["segment_ids"] = seg_BT
    return out


def attention_mask(prefix_len_B, seq_len: int, segment_ids_BT=None, xp=np):
    """allowed_BTS[b, q, k] = (k < prefix_len[b] or k <= q) [and segment_ids[b, q] == segment_ids[b, k]]."""
    q_T1 = xp.arange(seq_len)[:, None]
    k_1S = xp.arange(seq_len)[None, :]
    allowed = (k_1S[None] < xp.asarray(prefix_len_B)[:, None, None]) | (k_1S <= q_T1)[None]
    if segment_ids_BT is not None:
        seg = xp.asarray(segment_ids_BT)
        allowed = allowed & (seg[:, :, None] == seg[:, None, :])
    return allowed
