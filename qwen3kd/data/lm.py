"""Synthetic token data for plain causal-LM training of the student: one sequence per row, every
label learned (see data/batches.py for how rows become micro-batches). JSONL token data
(data.kind=tokens) is prepared like chat data (data/prepared.py)."""

from __future__ import annotations

import numpy as np

from qwen3kd.data.batches import Row


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


def _lm_row(ids: np.ndarray) -> Row:
    return Row(ids=ids, mask=np.ones(len(ids) - 1, dtype=np.float32))
