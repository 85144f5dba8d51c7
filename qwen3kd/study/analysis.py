"""The study's statistics (study/protocol.md, section 5): paired differences over seeds and
problems, the hierarchical bootstrap, equivalence by two one-sided tests, Holm's correction, and
the held / not held / inconclusive decision. numpy only; no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def paired_differences(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> list[np.ndarray]:
    """Per seed, correct_A − correct_B on each test problem (the same problems, in the same order,
    for both arms of a seed)."""
    if set(a) != set(b):
        raise ValueError(f"the arms ran different seeds: {sorted(a)} vs {sorted(b)}")
    out = []
    for s in sorted(a):
        x, y = np.asarray(a[s], dtype=float), np.asarray(b[s], dtype=float)
        if x.shape != y.shape or x.ndim != 1:
            raise ValueError(f"seed {s}: per-problem results of different shapes {x.shape} vs {y.shape}")
        out.append(x - y)
    return out


def hierarchical_bootstrap(diffs: list[np.ndarray], resamples: int = 10_000, seed: int = 0) -> np.ndarray:
    """The bootstrap distribution of the mean over seeds of each seed's mean difference: in each
    resample the seeds are drawn with replacement, then, for every draw, that seed's problems with
    replacement. A resample of a seed's problems is drawn as multinomial counts over its distinct
    values (the same distribution as drawing the problems one by one; the differences of 0/1
    outcomes take three values), so 10,000 resamples of 1,000 problems cost milliseconds."""
    k = len(diffs)
    if k == 0:
        raise ValueError("no seeds")
    rng = np.random.default_rng(seed)
    drawn = rng.integers(k, size=(resamples, k))
    means = np.empty((resamples, k))
    for s, d in enumerate(diffs):
        values, counts = np.unique(np.asarray(d, dtype=float), return_counts=True)
        where = drawn == s
        n = int(where.sum())
        draws = rng.multinomial(len(d), counts / len(d), size=n)
        means[where] = draws @ values / len(d)
    return means.mean(axis=1)


@dataclass(frozen=True)
class Comparison:
    effect: float  # mean over seeds of the per-seed mean paired difference
    ci95: tuple[float, float]
    ci90: tuple[float, float]
    p_greater: float  # one-sided bootstrap p-value of "A better than B": share of resamples ≤ 0
    boot: np.ndarray | None = field(default=None, compare=False, repr=False)  # the resamples

    def p_equivalent(self, margin: float) -> float:
        """The two one-sided tests' p-value of |A − B| < margin: the larger of the shares of
        resamples at or beyond +margin and at or below −margin (the p-value that enters Holm)."""
        if self.boot is None:
            raise ValueError("no bootstrap resamples kept")
        return float(max(np.mean(self.boot >= margin), np.mean(self.boot <= -margin)))


def compare(diffs: list[np.ndarray], resamples: int = 10_000, seed: int = 0) -> Comparison:
    boot = hierarchical_bootstrap(diffs, resamples, seed)
    q = np.quantile(boot, [0.025, 0.975, 0.05, 0.95])
    effect = float(np.mean([np.mean(d) for d in diffs]))
    return Comparison(effect, (float(q[0]), float(q[1])), (float(q[2]), float(q[3])),
                      float(np.mean(boot <= 0)), boot)


def equivalent(ci90: tuple[float, float], margin: float) -> bool:
    """Two one-sided tests at the 5 % level: the 90 % interval inside (−margin, +margin)."""
    return -margin < ci90[0] and ci90[1] < margin


def holm(p_values: list[float], alpha: float = 0.05) -> tuple[list[float], list[bool]]:
    """Holm's step-down: adjusted p-values (monotone, capped at 1) and which hypotheses are
    rejected at family-wise level `alpha`."""
    m = len(p_values)
    order = np.argsort(p_values, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted.tolist(), [bool(a <= alpha) for a in adjusted]


def decide(kind: str, c: Comparison, rejected: bool = False, margin: float = 0.03) -> str:
    """The protocol's verdict for one hypothesis and mode. kind: "superiority" (A better than B;
    `rejected`: its Holm-adjusted test rejected) or "equivalence" (|A − B| < margin; `rejected`:
    its two one-sided tests rejected after Holm)."""
    if kind == "superiority":
        if rejected and c.ci95[0] > 0:
            return "held"
        if c.ci95[1] < 0:
            return "not held"
    elif kind == "equivalence":  # `rejected`: its Holm-adjusted TOST p-value rejected
        if rejected and equivalent(c.ci90, margin):
            return "held"
        if c.ci95[0] >= margin or c.ci95[1] <= -margin:
            return "not held"
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return "inconclusive"
