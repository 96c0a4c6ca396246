"""pass@k against a brute-force enumeration over subsets; the bootstrap interval against the normal
approximation and against its coverage on fresh draws."""
from __future__ import annotations

import itertools

import pytest

import numpy as np

from stepcoder.metrics import bootstrap_ci, pass_at_k


def brute_force(n: int, c: int, k: int) -> float:
    """The share of k-subsets of n samples (c of them correct) holding at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


def test_pass_at_k_equals_enumeration_over_subsets():
    for n in range(1, 11):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_force(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    assert pass_at_k(200, 0, 10) == 0.0
    assert pass_at_k(200, 200, 100) == 1.0
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_bootstrap_interval_matches_the_normal_approximation():
    """For a mean over many problems the percentile bootstrap and mean +- 1.96 standard errors agree."""
    rng = np.random.default_rng(7)
    values = rng.binomial(4, 0.3, size=400) / 4  # 400 problems' pass rates from 4 samples each
    low, high = bootstrap_ci(values.tolist(), resamples=20000, seed=1)
    error = values.std(ddof=1) / np.sqrt(len(values))
    assert low == pytest.approx(values.mean() - 1.96 * error, abs=0.15 * error)
    assert high == pytest.approx(values.mean() + 1.96 * error, abs=0.15 * error)


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(11)
    covered = 0
    for trial in range(300):
        values = rng.binomial(4, 0.4, size=150) / 4
        low, high = bootstrap_ci(values.tolist(), resamples=1000, seed=trial)
        covered += low <= 0.4 <= high
    assert 0.90 <= covered / 300 <= 0.99
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_a_difference_whose_interval_includes_zero_says_what_that_means():
    """The before/after line names the interval's verdict; only when it includes 0 does a sentence follow
    saying the run cannot tell the change from chance and what to try."""
    from stepcoder.heldout import Evaluation, compare, describe

    rng = np.random.default_rng(7)
    problems = [f"p{i}" for i in range(400)]
    before = {p: int(rng.integers(0, 2)) for p in problems}
    noise = Evaluation(60, 1, {p: int(rng.integers(0, 2)) for p in problems}, {}, 0.0)
    gain = Evaluation(60, 1, {p: max(v, int(rng.random() < 0.5)) for p, v in before.items()}, {}, 0.0)
    start = Evaluation(0, 1, before, {}, 0.0)
    shown = describe(compare(start, gain), "synthetic:heldout", 0.0)
    assert "excludes 0" in shown and "cannot tell" not in shown
    unsure = compare(start, noise)
    low, high = unsure["difference_ci95"]
    assert low < 0 < high
    shown = describe(unsure, "synthetic:heldout", 0.0)
    assert "includes 0" in shown and "cannot tell the change from chance" in shown and "--total_steps" in shown
