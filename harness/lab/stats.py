"""Confidence intervals for metrics, and the repo's metric-with-CI convention.

A metric with a confidence interval is stored as {"value": v, "ci_low": l, "ci_high": h};
gates read `value`, or a bound with `ci_low(metric)` / `ci_high(metric)`. Also the tests and
multiple-comparison adjustments that pre-registered hypotheses name: two-sample tests, and
tests of a contrast of set means that resample at the level of replication (units).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Any

import numpy as np

DEFAULT_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 1000


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
    n_resamples: int = DEFAULT_RESAMPLES,
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
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> Interval:
    """mean(after) - mean(before) over paired observations, with a paired bootstrap CI
    (the same items are resampled for both, so the item-to-item variance cancels)."""
    before, after = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if before.shape != after.shape:
        raise ValueError(f"paired samples differ in shape: {before.shape} vs {after.shape}")
    return bootstrap(after - before, np.mean, n_resamples, confidence, seed)


def wilson(successes: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> Interval:
    """The proportion successes / n with its Wilson score interval: unlike the normal
    approximation it stays in [0, 1], and unlike a bootstrap it does not shrink to a point
    when every item succeeds (or none does), which small categories often do."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_label(
    of: str, n_resamples: int = DEFAULT_RESAMPLES, confidence: float = DEFAULT_CONFIDENCE
) -> str:
    """What a plot's bootstrap interval is, for its legend or axis: `bootstrap` over `of`."""
    return f"{confidence:.0%} bootstrap CI ({n_resamples:,} resamples of the {of})"


def wilson_label(confidence: float = DEFAULT_CONFIDENCE) -> str:
    return f"{confidence:.0%} Wilson CI"


# Two-sample hypothesis tests, for pre-registered hypotheses: a spec names the test, the
# alternative and the multiple-comparison adjustment before the data exist.

ALTERNATIVES = ("greater", "less", "two-sided")
TESTS = ("permutation", "bootstrap")
ADJUSTMENTS = ("holm", "bonferroni", "none")
_TIE_TOLERANCE = 1e-12  # relative to the data's scale: differences this close count as ties
MIN_UNITS = 3  # the fewest units per set a bootstrap is trusted with: 2 units give 3 distinct resamples
_BLOCK_CELLS = 1 << 21  # resamples are drawn in blocks of about this many values, to bound memory


@dataclass(frozen=True)
class TestResult:
    """A test of a contrast of means (two-sample: mean(a) - mean(b)): the effect with its bootstrap
    CI, and a p-value. `n_units` holds each set's number of independent units (observations)."""

    __test__ = False  # a class named Test* imported into a test module is not a test class

    effect: float
    ci: Interval
    p_value: float
    test: str
    alternative: str
    n_units: tuple[int, ...]
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
            "n_units": list(self.n_units),
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


def monte_carlo_p(observed: float, null: Sequence[float]) -> float:
    """(1 + #{null >= observed}) / (1 + n): the observed statistic counted among n draws of its
    null (relabellings, random directions), so p is never 0; ties within float noise count."""
    values = np.asarray(null, dtype=float)
    return float((1 + _extreme(values, observed, "greater", 1e-12)) / (1 + len(values)))


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
    resampling a and b independently. Hypotheses call it through `contrast_test`, on unit means.
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
    return TestResult(observed, ci, p_value, "permutation", alternative, (len(a), len(b)), n_resamples, exact)


# Tests at the level of replication. A set's values come grouped in units (harness.core.samples):
# the training runs of a fine-tuned model, say, whose answers are not independent draws of
# the claim's population; only the units are. A set's mean is the mean of its unit means, so
# every unit weighs the same, and resampling draws units, never values across units.

Units = Sequence[Sequence[float]]  # one set: the values of each of its units


def _units(units: Units, name: str) -> list[np.ndarray]:
    arrays = [_sample(u, f"{name}, unit {i}") for i, u in enumerate(units)]
    if not arrays:
        raise ValueError(f"set {name} has no units")
    return arrays


def _unit_means(units: list[np.ndarray]) -> np.ndarray:
    return np.array([u.mean() for u in units])


def _two_stage_means(units: list[np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` bootstrap means of a set: its units drawn with replacement, then each drawn unit's
    values drawn with replacement within it; the mean of the drawn units' means.

    A drawn unit's mean is its own mean m_u plus the within-unit resampling noise, and m_u's
    distance from the set mean is stretched by sqrt(k / (k - 1)): drawing k of k units with
    replacement shrinks the spread between them to (k - 1) / k of its unbiased estimate, which
    at three training runs would make the test reject too often."""
    k = len(units)
    means = _unit_means(units)
    stretched = means.mean() + (means - means.mean()) * math.sqrt(k / (k - 1)) if k > 1 else means
    picked = rng.integers(0, k, size=(size, k))
    sizes = np.array([len(u) for u in units])
    if sizes.max() == 1:  # one value per unit: no spread within units
        return stretched[picked].mean(axis=1)
    padded = np.zeros((k, sizes.max()))
    for i, u in enumerate(units):
        padded[i, : len(u)] = u
    n = sizes[picked]  # (size, k): the number of values of each drawn unit
    within = (rng.random((size, k, sizes.max())) * n[..., None]).astype(np.intp)
    kept = np.arange(sizes.max()) < n[..., None]
    resampled = (padded[picked[..., None], within] * kept).sum(axis=2) / n
    return (stretched[picked] + resampled - means[picked]).mean(axis=1)


def cluster_bootstrap_test(
    sets: Sequence[Units],
    weights: Sequence[float],
    alternative: str = "two-sided",
    n_resamples: int = 10000,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
    margin: float = 0.0,
) -> TestResult:
    """Bootstrap test of the contrast sum_s w_s * mean_s, each set resampled on its own, in two
    stages (units with replacement, then values within each drawn unit).

    A set of independent values (one per unit) is an ordinary bootstrap. The p-value is the
    centred bootstrap's: the null distribution is C* - C, the bootstrap distribution shifted
    onto 0 (resampling every set shifted so that the contrast is 0 gives the same, as the shifts
    cancel), and p = (count + 1) / (n + 1), count being the C* - C at least as extreme as C
    (two-sided: in absolute value). It assumes only that the contrast is 0, not that the sets are
    exchangeable.
    The spread between units is corrected for their small number (`_two_stage_means`); the
    within-unit noise, already in the unit means, is counted a second time, which makes the
    test conservative where runs differ little. With three runs per set (160 values each, a
    rate near 0.12) and no true effect it rejects in 5.5% of cases at alpha 0.05 where runs
    differ by an SD of 0.03, 6% at 0.05 and 0.1, 4% where they do not differ; pooling the runs'
    values and permuting them rejects in 11.5% and 22% (tests/test_stats.py). Hypotheses call
    a set of fewer than MIN_UNITS units too small for it (no power).
    `margin` is the contrast's value under the null (0: no effect); a one-sided test against
    a margin is a non-inferiority test ("less" than 0.05: the contrast stays below 0.05).
    """
    if len(sets) != len(weights) or not sets:
        raise ValueError(f"a contrast needs one weight per set: {len(sets)} sets, {len(weights)} weights")
    _check(alternative, n_resamples, confidence)
    arrays = [_units(units, f"#{i + 1}") for i, units in enumerate(sets)]
    w = np.asarray(weights, dtype=float)
    observed = float(sum(wi * _unit_means(u).mean() for wi, u in zip(w, arrays, strict=True)))
    rng = np.random.default_rng(seed)
    contrasts = np.empty(n_resamples)
    start = 0
    width = sum(len(u) * max(len(v) for v in u) for u in arrays)
    for size in _blocks(n_resamples, width):
        contrasts[start : start + size] = sum(
            wi * _two_stage_means(u, size, rng) for wi, u in zip(w, arrays, strict=True)
        )
        start += size
    scale = [np.concatenate(u) for u in arrays]
    count = _extreme(contrasts - observed, observed - margin, alternative, _tolerance(observed, *scale))
    p_value = (count + 1) / (n_resamples + 1)
    ci = _percentile_interval(observed, contrasts, confidence)
    n_units = tuple(len(u) for u in arrays)
    return TestResult(observed, ci, p_value, "bootstrap", alternative, n_units, n_resamples)


def contrast_test(
    name: str,
    sets: Sequence[Units],
    weights: Sequence[float],
    alternative: str = "two-sided",
    n_resamples: int = 10000,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
    margin: float = 0.0,
) -> TestResult:
    """The test a hypothesis names, on sets of units: `bootstrap` (`cluster_bootstrap_test`, any
    contrast) or `permutation` (two sets, a - b: whole units exchanged, `permutation_test` on the
    unit means; both sets' units must be of one kind, all single values or all groups of them).
    `margin`: the contrast's value under the null (a permutation then shifts a's unit means by
    it, the shift model; effect and CI are reported unshifted)."""
    if margin and alternative == "two-sided":
        raise ValueError("a margin needs a one-sided alternative (greater or less)")
    if name == "bootstrap":
        return cluster_bootstrap_test(sets, weights, alternative, n_resamples, seed, confidence, margin)
    if name != "permutation":
        raise ValueError(f"unknown test {name!r}; expected one of {', '.join(TESTS)}")
    if len(sets) != 2 or list(weights) != [1, -1]:
        raise ValueError("a permutation compares two sets, a - b; for a contrast of more sets use bootstrap")
    a, b = (_units(units, side) for units, side in zip(sets, "ab", strict=True))
    if (max(len(u) for u in a) == 1) != (max(len(u) for u in b) == 1):
        raise ValueError(
            "a permutation exchanges units between a and b, which needs units of one kind (single "
            "values in both, or groups such as training runs in both); use bootstrap to compare sets "
            "of different units"
        )
    shifted = permutation_test(
        _unit_means(a) - margin, _unit_means(b), alternative, n_resamples, seed, confidence
    )
    ci = Interval(shifted.ci.value + margin, shifted.ci.low + margin, shifted.ci.high + margin)
    return replace(shifted, effect=shifted.effect + margin, ci=ci)


def smallest_p(name: str, n_units: Sequence[int], alternative: str, n_resamples: int) -> float:
    """The smallest p-value the test can give at these numbers of units, whatever the data: a
    permutation of n_a + n_b units has C(n_a + n_b, n_a) labellings, the observed one among them
    (two-sided, with equal groups, its mirror image is as extreme); a sampled test counts +1."""
    floor = 1 / (n_resamples + 1)
    if name != "permutation":
        return floor
    n_a, n_b = n_units
    labellings = math.comb(n_a + n_b, n_a)
    extreme = 2 if alternative == "two-sided" and n_a == n_b else 1
    return extreme / labellings if labellings <= n_resamples else max(floor, extreme / labellings)


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
