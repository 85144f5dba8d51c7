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


class PackedSamples:
    """Chat samples in rows of at most seq_length + 1 tokens.

    Packing is best-fit decreasing within blocks of `block` samples (in the shuffled order):
    each sample, longest first, goes into the open row it fills best. Online first-fit in a random
    order wastes ~20 % of the rows when samples are a sizeable fraction of a row; best-fit
    decreasing is within 11/9 of the fewest rows possible, and blocks keep it O(n log n) with the
    rows of one block mixed from the same part of the shuffled data. Inside a row samples keep
    their shuffled order; the rows themselves are then shuffled (seeded), so an epoch does not run
    from the long samples to the short ones. Without packing, each sample is a row of its own.
    """

    def __init__(self, samples, seq: int, pack: bool, shuffle: bool, seed: int, block: int = 8192):
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(samples)) if shuffle else np.arange(len(samples))
        self.samples, cap = samples, seq + 1
        if pack:
            self.rows = []
            for b in range(0, len(order), block):
                self.rows += _best_fit_decreasing(order[b: b + block], samples, cap)
            if shuffle:
                self.rows = [self.rows[i] for i in rng.permutation(len(self.rows))]
        else:
            self.rows = [[int(i)] for i in order]
        used = sum(len(s.ids) for s in samples)
        self.fill = used / (max(len(self.rows), 1) * cap)

    def __len__(self) -> int:
        return len(self.rows)

    def row_samples(self, index: int) -> list:
        return [self.samples[i] for i in self.rows[index % len(self.rows)]]

    def row(self, index: int, seq: int) -> Row:
        parts = self.row_samples(index)
        ids = np.concatenate([s.ids for s in parts]).astype(np.int64)
        segments = np.concatenate([np.full(len(s.ids), k) for k, s in enumerate(parts)])
        mask = np.zeros(len(ids), dtype=np.float32)
        modes = np.zeros(len(ids), dtype=np.int64)
        start = 0
        for s in parts:
            # Position t predicts token t + 1: the answer's first token is learned at the last
            # prompt position; the sample's last token predicts a neighbour (not learned).
            mask[start + s.prompt_len - 1: start + len(s.ids) - 1] = 1.0
            modes[start: start + len(s.ids)] = s.mode
            start += len(s.ids)
        return Row(ids=ids, mask=mask[:-1], segments=segments, modes=modes[:-1])


def pack_rows(rows: list[Row], seq: int) -> list[Row]:
    """Rows of one sample each (e.g. rollouts) packed best-fit decreasing into rows of at most
    seq + 1 tokens; each sample keeps its mask and modes and attends only to itself."""
    out = []
    for group in _best_fit_decreasing(np.arange(len(rows)), rows, seq + 1):
        parts = [rows[i] for i in group]
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


def _best_fit_decreasing(indices: np.ndarray, samples, cap: int) -> list[list[int]]:
    """Rows of sample indices (each row's samples in the order of `indices`)."""
    import bisect

    rank = {int(i): k for k, i in enumerate(indices)}
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row), sorted: the best fit is a bisect away
    for i in sorted(rank, key=lambda i: (-len(samples[i].ids), rank[i])):
        n = len(samples[i].ids)
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            rows.append([i])
            bisect.insort(free, (cap - n, len(rows) - 1))
        else:
            left, r = free.pop(k)
            rows[r].append(i)
            bisect.insort(free, (left - n, r))
    for r in rows:
        r.sort(key=rank.__getitem__)
    rows.sort(key=lambda r: rank[r[0]])
    return rows
