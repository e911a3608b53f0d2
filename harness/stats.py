"""Confidence intervals for metrics, and the repo's metric-with-CI convention.

A metric with a confidence interval is stored as {"value": v, "ci_low": l, "ci_high": h};
gates read `value`, or a bound with `ci_low(metric)` / `ci_high(metric)`. Also the two-sample
tests and multiple-comparison adjustments that pre-registered hypotheses name.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
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
    return _percentile_interval(value, estimates, confidence)


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


# Two-sample hypothesis tests, for pre-registered hypotheses: a spec names the test, the
# alternative and the multiple-comparison adjustment before the data exist.

ALTERNATIVES = ("greater", "less", "two-sided")
TESTS = ("permutation", "bootstrap", "replicates")
ADJUSTMENTS = ("holm", "bonferroni", "none")
_TIE_TOLERANCE = 1e-12  # relative to the data's scale: differences this close count as ties
_BLOCK_CELLS = 1 << 21  # resamples are drawn in blocks of about this many values, to bound memory


@dataclass(frozen=True)
class TestResult:
    """A two-sample test of mean(a) - mean(b): the effect with its bootstrap CI, and a p-value."""

    __test__ = False  # a class named Test* imported into a test module is not a test class

    effect: float
    ci: Interval
    p_value: float
    test: str
    alternative: str
    n_a: int
    n_b: int
    n_resamples: int
    exact: bool = False  # the p-value enumerates every relabelling rather than sampling them

    def as_json(self) -> dict[str, Any]:
        """A metric in the repo's convention (gates read the effect, `ci_low(name)` its bound),
        with the test's p-value and provenance beside it."""
        return {
            **self.ci.as_metric(),
            "p_value": self.p_value,
            "test": self.test,
            "alternative": self.alternative,
            "n_a": self.n_a,
            "n_b": self.n_b,
            "n_resamples": self.n_resamples,
            "exact": self.exact,
        }


def _sample(data: Any, name: str) -> np.ndarray:
    values = np.asarray(data, dtype=float)
    if values.ndim != 1:
        raise ValueError(f"sample {name} must be one-dimensional, got shape {values.shape}")
    if len(values) == 0:
        raise ValueError(f"sample {name} is empty: a test needs at least one observation in each group")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"sample {name} contains NaN or infinite values")
    return values


def _check(alternative: str, n_resamples: int, confidence: float) -> None:
    if alternative not in ALTERNATIVES:
        raise ValueError(f"unknown alternative {alternative!r}; expected one of {', '.join(ALTERNATIVES)}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _blocks(total: int, width: int) -> list[int]:
    size = max(1, _BLOCK_CELLS // max(1, width))
    return [min(size, total - start) for start in range(0, total, size)]


def _tolerance(observed: float, *samples: np.ndarray) -> float:
    """Floating error in a mean scales with the data's magnitude, so ties are judged against it."""
    scale = max([abs(observed)] + [float(np.abs(s).max()) for s in samples])
    return _TIE_TOLERANCE * scale


def _extreme(null: np.ndarray, observed: float, alternative: str, tolerance: float) -> int:
    """How many null differences are at least as extreme as the observed one."""
    if alternative == "greater":
        hits = null >= observed - tolerance
    elif alternative == "less":
        hits = null <= observed + tolerance
    else:
        hits = np.abs(null) >= abs(observed) - tolerance
    return int(np.count_nonzero(hits))


def _bootstrap_differences(a: np.ndarray, b: np.ndarray, n_resamples: int, rng: np.random.Generator):
    """mean(a*) - mean(b*) with a and b resampled independently (the groups are not paired)."""
    out = np.empty(n_resamples)
    start = 0
    for size in _blocks(n_resamples, len(a) + len(b)):
        mean_a = a[rng.integers(0, len(a), size=(size, len(a)))].mean(axis=1)
        mean_b = b[rng.integers(0, len(b), size=(size, len(b)))].mean(axis=1)
        out[start : start + size] = mean_a - mean_b
        start += size
    return out


def _percentile_interval(value: float, estimates: np.ndarray, confidence: float) -> Interval:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(estimates, [tail, 100 - tail])
    return Interval(value, float(low), float(high))


def permutation_test(
    a: Any,
    b: Any,
    alternative: str = "two-sided",
    n_resamples: int = 10000,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> TestResult:
    """Two-sample permutation test of mean(a) - mean(b); "greater" is the alternative mean(a) > mean(b).

    Under the null the group labels are exchangeable, so the p-value is the share of relabellings
    whose difference is at least as extreme as the observed one (two-sided: in absolute value).
    When there are at most `n_resamples` distinct relabellings, C(n_a + n_b, n_a), all are
    enumerated and the p-value is exact; otherwise they are sampled, and p = (count + 1) / (n + 1)
    counts the observed labelling so that p is never 0. The effect's CI is a percentile bootstrap
    resampling a and b independently.
    """
    a, b = _sample(a, "a"), _sample(b, "b")
    _check(alternative, n_resamples, confidence)
    pooled = np.concatenate([a, b])
    n, k = len(pooled), len(a)
    total = pooled.sum()

    def differences(sum_a: np.ndarray) -> np.ndarray:  # one formula for observed and null alike
        return sum_a / k - (total - sum_a) / (n - k)

    observed = float(differences(np.array([a.sum()]))[0])
    tolerance = _tolerance(observed, pooled)
    permutation_rng, bootstrap_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    exact = math.comb(n, k) <= n_resamples
    if exact:
        labellings = np.array(list(itertools.combinations(range(n), k)), dtype=np.intp)
        count = _extreme(differences(pooled[labellings].sum(axis=1)), observed, alternative, tolerance)
        p_value = count / len(labellings)
    else:
        count = 0
        for size in _blocks(n_resamples, n):
            shuffled = permutation_rng.permuted(np.broadcast_to(pooled, (size, n)), axis=1)
            count += _extreme(differences(shuffled[:, :k].sum(axis=1)), observed, alternative, tolerance)
        p_value = (count + 1) / (n_resamples + 1)
    ci = _percentile_interval(observed, _bootstrap_differences(a, b, n_resamples, bootstrap_rng), confidence)
    return TestResult(observed, ci, p_value, "permutation", alternative, len(a), len(b), n_resamples, exact)


def bootstrap_test(
    a: Any,
    b: Any,
    alternative: str = "two-sided",
    n_resamples: int = 10000,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> TestResult:
    """Two-sample bootstrap test of mean(a) - mean(b); "greater" is the alternative mean(a) > mean(b).

    a and b are resampled independently, each keeping its own spread (unlike the permutation
    test, it does not assume the groups are exchangeable, only that their means are equal). The
    same resamples give the percentile CI and the p-value: the null distribution is the bootstrap
    difference centred on the observed one, d* - d. That is exactly the distribution got by
    resampling each group shifted onto the pooled mean, since the shifts cancel in the difference.
    p = (count + 1) / (n + 1), count being the centred differences at least as extreme as d
    (two-sided: in absolute value). Not studentized: for small groups (n < ~20) it rejects
    slightly too often, as the bootstrap variance of a mean is (n - 1) / n of the true one.
    """
    a, b = _sample(a, "a"), _sample(b, "b")
    _check(alternative, n_resamples, confidence)
    observed = float(a.mean() - b.mean())
    differences = _bootstrap_differences(a, b, n_resamples, np.random.default_rng(seed))
    count = _extreme(differences - observed, observed, alternative, _tolerance(observed, a, b))
    p_value = (count + 1) / (n_resamples + 1)
    ci = _percentile_interval(observed, differences, confidence)
    return TestResult(observed, ci, p_value, "bootstrap", alternative, len(a), len(b), n_resamples)


def replicates_test(
    a: Any,
    b: Any,
    alternative: str = "two-sided",
    n_resamples: int = 10000,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> TestResult:
    """Compares two statistics through their bootstrap replicates, not two samples of data.

    a and b are bootstrap replicates of one statistic each (e.g. the transition step of two
    training runs, each resampled from its own answers), drawn independently, so the
    differences a_i - b_i of replicates paired by index follow the sampling distribution of
    the difference. The effect is mean(a) - mean(b); the CI is the percentiles of the
    differences; the p-value is the share of differences on the far side of 0 ("greater":
    <= 0, "less": >= 0, two-sided: twice the smaller share), with the +1 correction, capped
    at 1. A two-sample test on replicates would treat them as observations and find any
    difference significant with enough resamples; this test does not. `n_resamples` and
    `seed` are unused: the replicates are the resamples.
    """
    a, b = _sample(a, "a"), _sample(b, "b")
    _check(alternative, max(n_resamples, 1), confidence)
    n = min(len(a), len(b))
    differences = a[:n] - b[:n]
    below = (int((differences <= 0).sum()) + 1) / (n + 1)
    above = (int((differences >= 0).sum()) + 1) / (n + 1)
    p_value = {"greater": below, "less": above, "two-sided": min(1.0, 2 * min(below, above))}[alternative]
    observed = float(a.mean() - b.mean())
    ci = _percentile_interval(observed, differences, confidence)
    return TestResult(observed, ci, p_value, "replicates", alternative, len(a), len(b), n)


def run_test(
    name: str,
    a: Any,
    b: Any,
    alternative: str = "two-sided",
    n_resamples: int = 10000,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> TestResult:
    """The test a spec names (one of TESTS)."""
    tests = {"permutation": permutation_test, "bootstrap": bootstrap_test, "replicates": replicates_test}
    if name not in tests:
        raise ValueError(f"unknown test {name!r}; expected one of {', '.join(TESTS)}")
    return tests[name](
        a, b, alternative=alternative, n_resamples=n_resamples, seed=seed, confidence=confidence
    )


def _p_values(p_values: Sequence[float]) -> np.ndarray:
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"p-values must be a flat sequence, got shape {p.shape}")
    if np.any(np.isnan(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError(f"p-values must be in [0, 1], got {p.tolist()}")
    return p


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni step-down adjusted p-values, in the input order.

    Controls the family-wise error rate like Bonferroni, but is uniformly more powerful: the
    i-th smallest p is multiplied by (m - i + 1), and a running maximum keeps the adjusted values
    in the order of the raw ones (so rejecting at adjusted p <= alpha is the step-down procedure).
    """
    p = _p_values(p_values)
    m = len(p)
    order = np.argsort(p, kind="stable")
    stepped = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    adjusted = np.empty(m)
    adjusted[order] = stepped
    return adjusted.tolist()


def adjust(p_values: Sequence[float], method: str = "holm") -> list[float]:
    """p-values adjusted for multiple comparisons by the method a spec names (one of ADJUSTMENTS)."""
    if method not in ADJUSTMENTS:
        raise ValueError(f"unknown adjustment {method!r}; expected one of {', '.join(ADJUSTMENTS)}")
    if method == "holm":
        return holm(p_values)
    p = _p_values(p_values)
    if method == "bonferroni":
        return np.minimum(1.0, p * len(p)).tolist()
    return p.tolist()
