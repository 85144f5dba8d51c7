"""Token data for plain causal-LM training of the student: one sequence per row, every label
learned (see data/batches.py for how rows become micro-batches)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qwen3kd.config.schema import DataConfig, DataKind
from qwen3kd.data.batches import Row
from qwen3kd.errors import DataError


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

    def row(self, index: int, seq: int) -> Row:
        rng = np.random.default_rng([self.seed, index])
        start = rng.integers(self.alphabet)
        stride = self.STRIDES[rng.integers(len(self.STRIDES))]
        return _lm_row((start + stride * np.arange(seq + 1)) % self.alphabet)


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

    def row(self, index: int, seq: int) -> Row:
        return _lm_row(self.rows[index % len(self.rows)][: seq + 1])


def _lm_row(ids: np.ndarray) -> Row:
    return Row(ids=ids, mask=np.ones(len(ids) - 1, dtype=np.float32))


def open_dataset(cfg: DataConfig, seed: int, vocab_size: int):
    if cfg.kind is DataKind.synthetic:
        return SyntheticTokens(seed, vocab_size)
    return JsonlTokens(str(Path(cfg.path)), vocab_size)
