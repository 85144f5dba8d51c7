"""Token data for plain causal-LM training (the student alone, before distillation exists).

A sample is addressed by its global index, so a run reads the same samples whatever its
data-parallel size: sample `step·G + r·G/DP + j` goes to data-parallel rank r (G = global batch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qwen3kd.config.schema import DataConfig, DataKind
from qwen3kd.errors import DataError

IGNORE = 0  # loss-mask value of padding


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [B, S] int64 input ids
    labels: torch.Tensor  # [B, S] int64, tokens shifted left by one
    loss_mask: torch.Tensor  # [B, S] float, 1 where the label is a real token
    position_ids: torch.Tensor  # [B, S]


class SyntheticTokens:
    """Arithmetic progressions mod a small alphabet: x_{t+1} = x_t + stride (mod A).

    The stride is visible from the first two tokens, so a tiny model drives the loss towards
    zero within a few dozen steps: enough to show an optimizer and a parallel layout work.
    """

    ALPHABET = 64
    STRIDES = (1, 2, 3, 5, 7)

    def __init__(self, seed: int, vocab_size: int):
        self.seed, self.alphabet = seed, min(self.ALPHABET, vocab_size)

    def __len__(self) -> int:
        return 2**62

    def sample(self, index: int, length: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index])
        start = rng.integers(self.alphabet)
        stride = self.STRIDES[rng.integers(len(self.STRIDES))]
        return (start + stride * np.arange(length)) % self.alphabet


class JsonlTokens:
    """JSONL, one {"input_ids": [...]} per line; a bad line is an error naming file and line."""

    def __init__(self, path: str, vocab_size: int):
        self.rows: list[np.ndarray] = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    ids = json.loads(line)["input_ids"]
                    arr = np.asarray(ids, dtype=np.int64)
                    if arr.ndim != 1 or len(arr) < 2:
                        raise ValueError("input_ids must be a list of at least 2 token ids")
                    if arr.min() < 0 or arr.max() >= vocab_size:
                        raise ValueError(f"token id out of range [0, {vocab_size})")
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise DataError(f"{path}:{n}: bad sample: {e}") from None
                self.rows.append(arr)
        if not self.rows:
            raise DataError(f"{path}: no samples")

    def __len__(self) -> int:
        return len(self.rows)

    def sample(self, index: int, length: int) -> np.ndarray:
        return self.rows[index % len(self.rows)][:length]


def open_dataset(cfg: DataConfig, seed: int, vocab_size: int):
    if cfg.kind is DataKind.synthetic:
        return SyntheticTokens(seed, vocab_size)
    return JsonlTokens(str(Path(cfg.path)), vocab_size)


def micro_batches(
    dataset, first_sample: int, global_batch: int, micro_batch: int, dp_rank: int, dp: int, seq: int
) -> list[MicroBatch]:
    """This data-parallel rank's micro-batches of the global batch that starts at sample
    `first_sample` (the data position: samples consumed by earlier steps)."""
    per_rank = global_batch // dp
    first = first_sample + dp_rank * per_rank
    out = []
    for m in range(per_rank // micro_batch):
        rows = [dataset.sample(first + m * micro_batch + j, seq + 1) for j in range(micro_batch)]
        buf = np.zeros((micro_batch, seq + 1), dtype=np.int64)
        mask = np.zeros((micro_batch, seq), dtype=np.float32)
        for j, r in enumerate(rows):
            buf[j, : len(r)] = r
            mask[j, : len(r) - 1] = 1.0
        t = torch.from_numpy(buf)
        out.append(MicroBatch(
            tokens=t[:, :-1].contiguous(),
            labels=t[:, 1:].contiguous(),
            loss_mask=torch.from_numpy(mask),
            position_ids=torch.arange(seq).unsqueeze(0).expand(micro_batch, seq).contiguous(),
        ))
    return out
