"""The vectorised best-fit decreasing packer (qwen3kd/data/packing.py) against the per-sample
Python implementation it replaced (kept here as the oracle): the same rows, in the same order."""

from __future__ import annotations

import bisect

import numpy as np
import pytest

from qwen3kd.data.packing import best_fit_decreasing, pack_index


def reference_bfd(lengths: list[int], cap: int) -> list[list[int]]:
    """One sample at a time, longest first: into the open row with the least free space that
    holds it (ties: the row opened first), else a new row."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            rows.append([i])
            bisect.insort(free, (cap - n, len(rows) - 1))
        else:
            left, r = free.pop(k)
            rows[r].append(i)
            bisect.insort(free, (left - n, r))
    for r in rows:
        r.sort()
    rows.sort(key=lambda r: r[0])
    return rows


def reference_index(lengths, cap, pack, shuffle, seed, block):
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    if not pack:
        return [[int(i)] for i in order]
    rows = []
    for b in range(0, len(order), block):
        ids = order[b: b + block]
        rows += [[int(ids[j]) for j in r] for r in reference_bfd([int(lengths[i]) for i in ids], cap)]
    if shuffle:
        rows = [rows[i] for i in rng.permutation(len(rows))]
    return rows


def as_rows(ptr, members):
    return [members[a:b].tolist() for a, b in zip(ptr[:-1], ptr[1:], strict=True)]


@pytest.mark.parametrize("seed", range(12))
def test_same_rows_as_the_per_sample_packer(seed):
    rng = np.random.default_rng(seed)
    cap = int(rng.choice([17, 64, 129, 257]))
    n = int(rng.integers(1, 400))
    # Short and long samples, many ties, some of exactly cap and of 1.
    lengths = np.minimum(rng.geometric(4 / cap, n), cap)
    lengths[rng.random(n) < 0.05] = cap
    lengths[rng.random(n) < 0.05] = 1
    assert as_rows(*best_fit_decreasing(lengths, cap)) == reference_bfd(lengths.tolist(), cap)


def test_hand_case():
    # 6 → new row A (free 4); 5 → new row B (free 5); 4 → A, an exact fit (not B); 3 → B
    # (free 2); 3 → new row C; 2 → B (free 0). Rows by their first sample: B, A, C.
    lengths = [3, 6, 2, 5, 4, 3]
    rows = as_rows(*best_fit_decreasing(np.array(lengths), 10))
    assert rows == [[0, 2, 3], [1, 4], [5]] == reference_bfd(lengths, 10)
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)


@pytest.mark.parametrize("pack,shuffle", [(True, True), (True, False), (False, True), (False, False)])
def test_dataset_index_matches(pack, shuffle):
    lengths = np.random.default_rng(3).integers(5, 120, 3000)
    got = as_rows(*pack_index(lengths, 129, pack, shuffle, seed=7, block=500))
    assert got == reference_index(lengths, 129, pack, shuffle, 7, 500)
    assert sorted(i for r in got for i in r) == list(range(3000))  # every sample once


def test_too_long_is_an_error():
    with pytest.raises(ValueError, match="1..8"):
        best_fit_decreasing(np.array([3, 9]), 8)
