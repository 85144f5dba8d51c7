"""Packing samples into rows of at most seq_length + 1 tokens, from their lengths alone.

Best-fit decreasing: each sample, longest first (ties in the given order), goes into the open row
whose free space it fills best (ties: the row opened first); a row is opened when none has room.
Online first-fit in a random order wastes ~20 % of the rows when samples are a sizeable fraction of
a row; best-fit decreasing is within 11/9 of the fewest rows possible.

It is vectorised over samples of equal length: rows are kept in buckets by their free space, and
the samples of one length go, as many per row as fit, to the rows of the smallest bucket that has
room (a row that takes one sample of length L keeps being the best fit for the next one until its
free space drops below L), so the Python loop runs over (length, bucket) pairs, never per sample.

`pack_index` is the dataset's packing (shuffled, in blocks, rows shuffled); `cached_pack_index`
keeps it on disk next to a prepared dataset, keyed by what decides it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

BLOCK = 8192  # samples packed together: rows mix samples from one part of the shuffled order


def best_fit_decreasing(lengths: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of positions into `lengths` as (row_ptr [R + 1], members): row r holds
    members[row_ptr[r]:row_ptr[r + 1]], in increasing position; rows are ordered by their first
    member."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if n == 0:
        return np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if lengths.min() < 1 or lengths.max() > cap:
        raise ValueError(f"sample lengths must be in 1..{cap}")
    order = np.lexsort((np.arange(n), -lengths))  # longest first, then by position
    sorted_len = lengths[order]
    row_of = np.empty(n, dtype=np.int64)
    buckets: dict[int, list[np.ndarray]] = {}  # free space → row ids (chunks; sorted on use)
    has_rows = np.zeros(cap + 1, dtype=bool)
    rows = 0
    cuts = np.flatnonzero(np.diff(sorted_len)) + 1
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, n], strict=True):
        size, group = int(sorted_len[lo]), order[lo:hi]
        done = 0
        while done < len(group):
            room = np.flatnonzero(has_rows[size:])
            if len(room):  # the fullest rows with room, lowest row id first
                free = size + int(room[0])
                ids = np.sort(np.concatenate(buckets.pop(free)))
                has_rows[free] = False
            else:  # new rows
                free = cap
                ids = np.arange(rows, rows + len(group) - done)  # enough, whatever fits per row
            per_row = free // size
            used = min(len(ids), -(-(len(group) - done) // per_row))
            taken, left = ids[:used], ids[used:]
            if free == cap and not len(room):
                rows += used
            elif len(left):
                buckets[free] = [left]
                has_rows[free] = True
            count = min(len(group) - done, used * per_row)
            row_of[group[done: done + count]] = taken[np.arange(count) // per_row]
            filled = np.full(used, per_row)
            filled[-1] = count - per_row * (used - 1)
            for f in np.unique(free - filled * size):
                moved = taken[(free - filled * size) == f]
                if f > 0:
                    buckets.setdefault(int(f), []).append(moved)
                    has_rows[f] = True
            done += count
    by_row = np.lexsort((np.arange(n), row_of))  # each row's members in increasing position
    sizes = np.bincount(row_of, minlength=rows)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    rank = np.argsort(by_row[starts], kind="stable")  # rows by their first member
    return _reorder(starts, sizes, by_row, rank)


def _reorder(starts: np.ndarray, sizes: np.ndarray, members: np.ndarray,
             rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows given by (starts, sizes) into `members`, taken in the order `rank`."""
    sizes = sizes[rank]
    ptr = np.r_[0, np.cumsum(sizes)].astype(np.int64)
    gather = np.repeat(starts[rank] - ptr[:-1], sizes) + np.arange(ptr[-1])
    return ptr, members[gather].astype(np.int64)


def pack_index(lengths: np.ndarray, cap: int, pack: bool, shuffle: bool, seed: int,
               block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """The dataset's rows as (row_ptr, members) of sample indices: samples shuffled (seeded),
    packed best-fit decreasing within blocks of `block` samples of that order (inside a row in
    that order), the rows then shuffled so an epoch does not run from long samples to short ones.
    Without packing each sample is a row of its own."""
    n = len(lengths)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n) if shuffle else np.arange(n)
    if not pack:
        return np.arange(n + 1, dtype=np.int64), order.astype(np.int64)
    ptrs, members, offset = [np.zeros(1, dtype=np.int64)], [], 0
    for b in range(0, n, block):
        ids = order[b: b + block]
        ptr, local = best_fit_decreasing(np.asarray(lengths)[ids], cap)
        ptrs.append(ptr[1:] + offset)
        members.append(ids[local])
        offset += len(local)
    ptr, members = np.concatenate(ptrs), np.concatenate(members) if members else np.zeros(0, np.int64)
    if shuffle:
        sizes = np.diff(ptr)
        ptr, members = _reorder(ptr[:-1], sizes, members, rng.permutation(len(sizes)))
    return ptr, members.astype(np.int64)


def cached_pack_index(folder: Path, dataset_id: str, lengths_of, cap: int, pack: bool,
                      shuffle: bool, seed: int, build: bool) -> tuple[np.ndarray, np.ndarray]:
    """`pack_index` kept in `folder` under a key of everything that decides it. `build`: this
    rank builds it when missing (one rank does; the others wait for its files, see
    prepared.wait_for). Loaded memory-mapped."""
    from qwen3kd.data.prepared import locked, wait_for
    from qwen3kd.files import write_bytes_atomic

    spec = {"dataset": dataset_id, "cap": cap, "pack": pack, "shuffle": shuffle, "seed": seed,
            "block": BLOCK, "version": 1}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    ptr_path, members_path = folder / f"pack-{key}.ptr.npy", folder / f"pack-{key}.members.npy"
    if not members_path.is_file():
        if build:
            with locked(folder):
                if not members_path.is_file():
                    ptr, members = pack_index(lengths_of(), cap, pack, shuffle, seed)
                    write_bytes_atomic(ptr_path, _npy_bytes(ptr))
                    write_bytes_atomic(members_path, _npy_bytes(members))  # last: says done
                    log.info("%s: packing index built (%d rows)", folder, len(ptr) - 1)
        else:
            wait_for(members_path, f"the packing index {members_path} (built by rank 0)")
    return np.load(ptr_path, mmap_mode="r"), np.load(members_path, mmap_mode="r")


def _npy_bytes(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()
