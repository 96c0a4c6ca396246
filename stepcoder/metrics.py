"""Evaluation metrics: pass@k and bootstrap confidence intervals."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

KS = (1, 5, 10)  # the k of pass@k reported where the samples per problem allow


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k (Chen et al., 2021) from n samples of which c passed:
    1 - C(n-c, k) / C(n, k), computed as a product so large n does not overflow."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError("pass_at_k takes ints")
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def bootstrap_ci(values: Sequence[float], level: float = 0.95, resamples: int = 4000,
                 seed: int = 0) -> tuple[float, float]:
    """A percentile-bootstrap confidence interval for the mean of `values` (one value per problem, so
    problems are the resampled unit; for a paired difference, pass each problem's difference)."""
    if not values:
        raise ValueError("bootstrap_ci needs at least one value")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)
