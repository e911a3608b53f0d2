"""Confidence intervals for metrics, and the repo's metric-with-CI convention.

A metric with a confidence interval is stored as {"value": v, "ci_low": l, "ci_high": h};
gates read `value`, or a bound with `ci_low(metric)` / `ci_high(metric)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate and its confidence interval."""

    value: float
    low: float
    high: float

    def as_metric(self) -> dict[str, float]:
        return {"value": self.value, "ci_low": self.low, "ci_high": self.high}


def bootstrap(
    data: Any,
    statistic: Callable[..., Any] = np.mean,
    n_resamples: int = 1000,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap of `statistic` over the rows (axis 0) of `data`.

    `statistic(x, axis=...)` must reduce along the given axis, as numpy's reductions do;
    resampling whole rows keeps paired columns paired. The point estimate is the statistic
    of the data itself, not the mean of the resamples.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    values = np.asarray(data, dtype=float)
    if values.ndim == 0 or len(values) == 0:
        raise ValueError("bootstrap needs at least one observation")
    value = float(statistic(values, axis=0))
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(values), size=(n_resamples, len(values)))
    estimates = np.asarray(statistic(values[rows], axis=1), dtype=float)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(estimates, [tail, 100 - tail])
    return Interval(value, float(low), float(high))


def paired_difference(
    before: Any,
    after: Any,
    n_resamples: int = 1000,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> Interval:
    """mean(after) - mean(before) over paired observations, with a paired bootstrap CI
    (the same items are resampled for both, so the item-to-item variance cancels)."""
    before, after = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if before.shape != after.shape:
        raise ValueError(f"paired samples differ in shape: {before.shape} vs {after.shape}")
    return bootstrap(after - before, np.mean, n_resamples, confidence, seed)
