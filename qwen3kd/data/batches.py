"""Rows and micro-batches: what the trainer feeds the models.

A dataset is a sequence of *rows* addressed by a global index: row `step·G + r·G/DP + j` goes to
data-parallel rank r (G = global batch), so a run reads the same rows whatever its data-parallel
size, and the data position of a checkpoint is one number. A row holds up to seq_length + 1
tokens (inputs and the last label); with packing it holds several samples, each attending only
to itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Row:
    ids: np.ndarray  # [n ≤ S + 1] token ids
    mask: np.ndarray  # [n − 1] float32: 1 where the label ids[t + 1] is learned
    segments: np.ndarray | None = None  # [n] which packed sample each token belongs to
    modes: np.ndarray | None = None  # [n − 1] mode id of each label (chat data)
    advantages: np.ndarray | None = None  # [n − 1] float32 per label (policy-gradient rollouts)


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [B, S] int64 input ids
    labels: torch.Tensor  # [B, S] int64, tokens shifted left by one
    loss_mask: torch.Tensor  # [B, S] float, 1 where the label is learned
    position_ids: torch.Tensor  # [B, S], restarting at 0 with each packed sample
    segments: torch.Tensor | None = None  # [B, S] packed-sample id per position, -1 for padding
    modes: torch.Tensor | None = None  # [B, S] int64 mode id per label (0 where unmasked)
    groups: torch.Tensor | None = None  # [B, S] int64 metric group per label (evaluation)
    advantages: torch.Tensor | None = None  # [B, S] float per label (GRPO; 0 where unmasked)
    n_tokens: int = 0  # input positions holding tokens (not padding): what a forward computes on
    # The teacher's final hidden states of these tokens [S(/TP), B, H_t], on the student's last
    # stage, during the step only (teacher/frozen.py sets and releases it).
    teacher_hidden: torch.Tensor | None = None

    def attention_mask(self) -> torch.Tensor | None:
        return packed_attention_mask(self.segments)


def packed_attention_mask(segments: torch.Tensor | None) -> torch.Tensor | None:
    """[B, 1, S, S] bool, True where attention is *not* allowed (megatron's convention): causal
    and within one packed sample. None when no row holds two samples (the model's own causal mask
    is enough). RoPE needs no position reset: attention scores depend only on relative positions,
    which are the same inside a sample wherever it is packed."""
    if segments is None or int(segments.max()) < 1:
        return None  # at most one sample per row: causal attention keeps padding out of it
    same = segments[:, :, None] == segments[:, None, :]
    causal = torch.ones(segments.shape[1], segments.shape[1], dtype=torch.bool,
                        device=segments.device).tril_()
    return ~(same & causal)[:, None]


def micro_batches(dataset, first_row: int, global_batch: int, micro_batch: int, dp_rank: int,
                  dp: int, seq: int) -> list[MicroBatch]:
    """This data-parallel rank's micro-batches of the global batch starting at row `first_row`
    (the data position: rows consumed by earlier steps)."""
    per_rank = global_batch // dp
    first = first_row + dp_rank * per_rank
    return [collate([dataset.row(first + m * micro_batch + j, seq) for j in range(micro_batch)], seq)
            for m in range(per_rank // micro_batch)]


def collate(rows: list[Row], seq: int) -> MicroBatch:
    b = len(rows)
    ids = np.zeros((b, seq + 1), dtype=np.int64)
    mask = np.zeros((b, seq), dtype=np.float32)
    packed = any(r.segments is not None for r in rows)
    segments = np.full((b, seq + 1), -1, dtype=np.int64)
    modes = np.zeros((b, seq), dtype=np.int64)
    adv = np.zeros((b, seq), dtype=np.float32)
    for j, r in enumerate(rows):
        n = len(r.ids)
        ids[j, :n] = r.ids
        mask[j, : n - 1] = r.mask
        segments[j, :n] = r.segments if r.segments is not None else 0
        if r.modes is not None:
            modes[j, : n - 1] = r.modes
        if r.advantages is not None:
            adv[j, : n - 1] = r.advantages
    seg = segments[:, :-1]
    # Position within the sample: index minus the sample's first index.
    starts = np.maximum.accumulate(
        np.where(np.diff(seg, axis=1, prepend=-2) != 0, np.arange(seq)[None, :], 0), axis=1)
    t = torch.from_numpy(ids)
    return MicroBatch(
        tokens=t[:, :-1].contiguous(),
        labels=t[:, 1:].contiguous(),
        loss_mask=torch.from_numpy(mask),
        position_ids=torch.from_numpy(np.arange(seq)[None, :] - starts),
        segments=torch.from_numpy(np.ascontiguousarray(seg)) if packed else None,
        modes=torch.from_numpy(modes) if any(r.modes is not None for r in rows) else None,
        advantages=torch.from_numpy(adv) if any(r.advantages is not None for r in rows) else None,
        n_tokens=int((seg >= 0).sum()),
    )


def pack_rows(rows: list[Row], seq: int) -> list[Row]:
    """Rows of one sample each (e.g. rollouts) packed best-fit decreasing into rows of at most
    seq + 1 tokens; each sample keeps its mask and modes and attends only to itself."""
    from qwen3kd.data.packing import best_fit_decreasing

    out = []
    ptr, members = best_fit_decreasing(np.array([len(r.ids) for r in rows]), seq + 1)
    for lo, hi in zip(ptr[:-1], ptr[1:], strict=True):
        parts = [rows[i] for i in members[lo:hi]]
        # A sample's last position would predict the next sample's first token: never learned.
        mask = np.concatenate([np.append(r.mask, 0.0) for r in parts])[:-1].astype(np.float32)
        modes = adv = None
        if parts[0].modes is not None:
            modes = np.concatenate([np.append(r.modes, 0) for r in parts])[:-1]
        if parts[0].advantages is not None:
            adv = np.concatenate([np.append(r.advantages, 0.0) for r in parts])[:-1].astype(np.float32)
        out.append(Row(ids=np.concatenate([r.ids for r in parts]), mask=mask, modes=modes,
                       segments=np.concatenate([np.full(len(r.ids), k) for k, r in enumerate(parts)]),
                       advantages=adv))
    return out


def empty_row(pad_id: int) -> Row:
    """A row that learns nothing (fills a micro-batch)."""
    return Row(ids=np.array([pad_id], dtype=np.int64), mask=np.zeros(0, dtype=np.float32),
               modes=np.zeros(0, dtype=np.int64))
