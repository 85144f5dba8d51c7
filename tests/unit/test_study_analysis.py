"""The study's statistics (qwen3kd/study/analysis.py) against known answers: bootstrap coverage on
synthetic data, the multinomial shortcut against plain resampling, Holm and equivalence by hand."""

from __future__ import annotations

import numpy as np
import pytest

from qwen3kd.study.analysis import (
    Comparison,
    compare,
    decide,
    equivalent,
    hierarchical_bootstrap,
    holm,
    paired_differences,
)


def synthetic(rng, seeds: int, problems: int, effect: float, seed_sd: float) -> list[np.ndarray]:
    """Per seed, paired 0/1 outcomes of two arms on the same problems (correlated through the
    problem), whose true mean difference is `effect` plus a seed-level N(0, seed_sd²) shift."""
    out = []
    for _ in range(seeds):
        d = effect + rng.normal(0, seed_sd)
        u = rng.random(problems)
        v = np.where(rng.random(problems) < 0.7, u, rng.random(problems))
        out.append((u < 0.6 + d / 2).astype(float) - (v < 0.6 - d / 2).astype(float))
    return out


def coverage(seed_sd: float, datasets: int = 400) -> float:
    rng = np.random.default_rng(7)
    hits = 0
    for i in range(datasets):
        c = compare(synthetic(rng, 3, 1000, 0.03, seed_sd), resamples=2000, seed=i)
        hits += c.ci95[0] <= 0.03 <= c.ci95[1]
    return hits / datasets


def test_the_95_interval_covers_a_known_difference_at_its_nominal_rate():
    # 3 seeds × 1,000 problems, the study's shape, with a seed-to-seed spread of 1 point (about
    # the problem-level standard error, as the demo's seeds showed): 95 % ± 2 binomial SE.
    assert 0.928 <= coverage(0.01) <= 0.972
    # Identical seeds: problems are counted at both levels, the interval is conservative.
    assert coverage(0.0, 200) >= 0.95


def test_the_multinomial_shortcut_is_plain_resampling():
    rng = np.random.default_rng(0)
    diffs = synthetic(rng, 3, 300, 0.05, 0.02)
    fast = hierarchical_bootstrap(diffs, 20_000, seed=1)
    slow = []
    for _ in range(4000):
        picked = rng.integers(3, size=3)
        slow.append(np.mean([rng.choice(diffs[s], size=len(diffs[s])).mean() for s in picked]))
    assert fast.mean() == pytest.approx(np.mean(slow), abs=0.003)
    assert fast.std() == pytest.approx(np.std(slow), rel=0.06)


def test_paired_differences_need_the_same_seeds_and_problems():
    a = {0: np.array([1, 0, 1]), 1: np.array([0, 0, 1])}
    b = {0: np.array([0, 0, 1]), 1: np.array([1, 0, 1])}
    assert [d.tolist() for d in paired_differences(a, b)] == [[1, 0, 0], [-1, 0, 0]]
    with pytest.raises(ValueError, match="different seeds"):
        paired_differences(a, {0: b[0]})
    with pytest.raises(ValueError, match="seed 1: per-problem results of different shapes"):
        paired_differences(a, {0: b[0], 1: np.array([1, 0])})


def test_holm_by_hand():
    # Sorted 0.005, 0.01, 0.03, 0.04 → ×4, ×3, ×2, ×1 = 0.02, 0.03, 0.06, 0.04 → monotone:
    # 0.02, 0.03, 0.06, 0.06.
    adjusted, rejected = holm([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert rejected == [True, False, False, True]
    assert holm([0.3, 0.6])[0] == pytest.approx([0.6, 0.6]) and holm([0.9, 0.8])[0] == [1.0, 1.0]


def test_equivalence_and_decisions_by_hand():
    assert equivalent((-0.02, 0.025), 0.03) and not equivalent((-0.02, 0.031), 0.03)
    c = lambda lo, hi, lo90, hi90: Comparison(0.0, (lo, hi), (lo90, hi90), 0.0)  # noqa: E731
    assert decide("superiority", c(0.01, 0.05, 0.015, 0.045), rejected=True) == "held"
    assert decide("superiority", c(0.01, 0.05, 0.015, 0.045), rejected=False) == "inconclusive"
    assert decide("superiority", c(-0.05, -0.01, -0.045, -0.015)) == "not held"
    assert decide("superiority", c(-0.01, 0.03, 0.0, 0.02)) == "inconclusive"
    assert decide("equivalence", c(-0.03, 0.028, -0.025, 0.02), rejected=True) == "held"
    assert decide("equivalence", c(-0.03, 0.028, -0.025, 0.02), rejected=False) == "inconclusive"
    assert decide("equivalence", c(0.035, 0.08, 0.04, 0.07)) == "not held"
    assert decide("equivalence", c(-0.01, 0.05, 0.0, 0.04)) == "inconclusive"


def test_tost_p_value_by_hand():
    c = Comparison(0.0, (0, 0), (0, 0), 0.0, np.array([-0.04, -0.01, 0.0, 0.01, 0.02, 0.05, 0.03, 0.0]))
    # At or beyond +0.03: 0.05, 0.03 (2 of 8); at or below −0.03: −0.04 (1 of 8).
    assert c.p_equivalent(0.03) == pytest.approx(2 / 8)
    assert c.p_equivalent(0.06) == 0.0
    with pytest.raises(ValueError, match="no bootstrap"):
        Comparison(0.0, (0, 0), (0, 0), 0.0).p_equivalent(0.03)
