"""The two-sample tests and p-value adjustments of harness.lab.stats, on known answers: hand-enumerable
permutation p-values, error rates and coverage over simulated datasets, a hand-worked Holm example."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.lab.stats import (
    ADJUSTMENTS,
    ALTERNATIVES,
    TESTS,
    adjust,
    cluster_bootstrap_test,
    contrast_test,
    holm,
    monte_carlo_p,
    permutation_test,
    smallest_p,
    wilson,
)


def bootstrap_test(a, b, alternative="two-sided", n_resamples=10000, seed=0, confidence=0.95):
    """The bootstrap hypotheses run, on two sets whose every value is its own unit."""
    units = [[[v] for v in a], [[v] for v in b]]
    return cluster_bootstrap_test(units, [1, -1], alternative, n_resamples, seed, confidence)


def run_test(name, a, b, **options):
    return contrast_test(name, [[[v] for v in a], [[v] for v in b]], [1, -1], **options)


# --- permutation test: exact enumeration ---------------------------------------------------------


def test_permutation_exact_on_hand_computable_example():
    # 20 ways to pick a's three labels from six values; only {1, 2, 3} gives a difference as low
    # as the observed -3, and only {1, 2, 3} and {4, 5, 6} give one as large in absolute value.
    less = permutation_test([1, 2, 3], [4, 5, 6], alternative="less")
    assert less.exact
    assert less.p_value == 1 / 20
    assert less.effect == -3.0
    assert permutation_test([1, 2, 3], [4, 5, 6]).p_value == 2 / 20
    assert permutation_test([1, 2, 3], [4, 5, 6], alternative="greater").p_value == 1.0
    assert permutation_test([4, 5, 6], [1, 2, 3], alternative="greater").p_value == 1 / 20


def test_permutation_identical_samples_give_p_one():
    assert permutation_test([1, 2, 3], [1, 2, 3]).p_value == 1.0
    same = [0.1, 0.7, 0.3, 0.9, 0.2, 0.4, 0.8, 0.6, 0.5, 1.1]
    sampled = permutation_test(same, same, n_resamples=99)  # C(20, 10) relabellings: sampled
    assert not sampled.exact
    assert sampled.p_value == 1.0


def test_permutation_counts_floating_ties_as_ties():
    # The difference is 0 for the observed labelling and for a = {0.3, 0.0}, but 0.1 + 0.2 != 0.3 in
    # floating point (the latter comes out -5.6e-17): without a tolerance "greater" loses that tie
    # (p 3/6 rather than 4/6). Ties count on both sides, so "less" is 4/6 too.
    assert permutation_test([0.1, 0.2], [0.3, 0.0], alternative="greater").p_value == pytest.approx(4 / 6)
    assert permutation_test([0.1, 0.2], [0.3, 0.0], alternative="less").p_value == pytest.approx(4 / 6)


def test_permutation_enumerates_exactly_when_relabellings_fit():
    assert permutation_test([1, 2, 3], [4, 5, 6], n_resamples=20).exact  # C(6, 3) = 20
    sampled = permutation_test([1, 2, 3], [4, 5, 6], alternative="less", n_resamples=19)
    assert not sampled.exact
    assert sampled.p_value >= 1 / 20  # (count + 1) / (n + 1), never below the one labelling


def test_permutation_monte_carlo_p_is_never_zero():
    # 1 in C(20, 10) = 184756 relabellings is as extreme as this: 99 draws all miss it, and the
    # (count + 1) / (n + 1) correction leaves p at 1/100 rather than 0.
    result = permutation_test(range(10), range(100, 110), alternative="less", n_resamples=99)
    assert not result.exact
    assert result.p_value == 1 / 100


def _brute_force_p(a, b, alternative):
    pooled = list(a) + list(b)
    observed = np.mean(a) - np.mean(b)
    hits = 0
    labellings = list(itertools.combinations(range(len(pooled)), len(a)))
    for chosen in labellings:
        x = [pooled[i] for i in chosen]
        y = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        d = np.mean(x) - np.mean(y)
        hits += {"greater": d >= observed, "less": d <= observed, "two-sided": abs(d) >= abs(observed)}[
            alternative
        ]
    return hits / len(labellings)


@pytest.mark.parametrize("alternative", ALTERNATIVES)
def test_permutation_exact_matches_brute_force(alternative):
    rng = np.random.default_rng(7)
    a, b = rng.integers(0, 10, size=5), rng.integers(2, 12, size=4)  # integers: ties, exactly
    expected = _brute_force_p(a, b, alternative)
    assert permutation_test(a, b, alternative=alternative).p_value == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("alternative", ALTERNATIVES)
def test_permutation_monte_carlo_agrees_with_exact(alternative):
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.6, 1, size=8), rng.normal(0, 1, size=8)  # C(16, 8) = 12870 relabellings
    exact = permutation_test(a, b, alternative=alternative, n_resamples=20000)
    sampled = permutation_test(a, b, alternative=alternative, n_resamples=5000)
    assert exact.exact and not sampled.exact
    assert 0.02 < exact.p_value < 0.98  # not a trivial agreement at the ends
    assert sampled.p_value == pytest.approx(exact.p_value, abs=0.02)  # 3 sd of the sampled p


# --- permutation test: Monte Carlo on known distributions ----------------------------------------


def test_permutation_detects_half_sd_difference():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.5, 1, size=200), rng.normal(0, 1, size=200)
    result = permutation_test(a, b)
    assert not result.exact
    assert result.p_value < 0.001
    assert permutation_test(a, b, alternative="greater").p_value < 0.001
    assert permutation_test(a, b, alternative="less").p_value > 0.99
    assert result.ci.low < 0.5 < result.ci.high


def test_permutation_false_positive_rate_is_alpha():
    rejections = 0
    for seed in range(400):
        rng = np.random.default_rng(seed)
        a, b = rng.normal(size=30), rng.normal(size=30)
        rejections += permutation_test(a, b, n_resamples=500, seed=seed).p_value <= 0.05
    assert 0.02 <= rejections / 400 <= 0.09


def test_permutation_is_reproducible_from_seed():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=20), rng.normal(0.3, 1, size=20)
    assert permutation_test(a, b, n_resamples=300, seed=5) == permutation_test(a, b, n_resamples=300, seed=5)
    assert permutation_test(a, b, n_resamples=300, seed=5) != permutation_test(a, b, n_resamples=300, seed=6)


# --- bootstrap test ------------------------------------------------------------------------------


def test_bootstrap_ci_covers_true_difference():
    covered = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        a, b = rng.normal(1.0, 1, size=40), rng.normal(0.7, 2, size=40)  # true difference 0.3
        ci = bootstrap_test(a, b, n_resamples=1000, seed=seed).ci
        covered += ci.low <= 0.3 <= ci.high
    assert 0.90 <= covered / 200 <= 0.99


@pytest.mark.parametrize("name", TESTS)
@pytest.mark.parametrize("confidence, z", [(0.95, 1.959964), (0.90, 1.644854)])
def test_ci_matches_normal_theory_for_large_samples(name, confidence, z):
    # For 200 and 300 observations the difference in means is close to normal: the percentile CI
    # is about effect +- z * SE. A coverage check over 200 datasets cannot tell 90% from 95%; this can.
    rng = np.random.default_rng(2)
    a, b = rng.normal(0, 1, size=200), rng.exponential(2, size=300)
    se = math.sqrt(a.var() / len(a) + b.var() / len(b))
    result = run_test(name, a, b, n_resamples=10000, confidence=confidence)
    assert (result.ci.high - result.ci.low) / 2 == pytest.approx(z * se, rel=0.05)
    assert (result.ci.high + result.ci.low) / 2 == pytest.approx(result.effect, abs=0.1 * se)


def test_bootstrap_false_positive_rate_near_alpha():
    # Equal means but unequal spread and shape: the null the bootstrap test is built for.
    rejections = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        a, b = rng.normal(1, 1, size=40), rng.exponential(1, size=40)
        rejections += bootstrap_test(a, b, n_resamples=1000, seed=seed).p_value <= 0.05
    assert 0.02 <= rejections / 200 <= 0.08


def test_bootstrap_detects_real_difference_and_its_direction():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.5, 1, size=200), rng.normal(0, 1, size=200)
    n = 2000
    two_sided = bootstrap_test(a, b, n_resamples=n)
    greater = bootstrap_test(a, b, alternative="greater", n_resamples=n)
    less = bootstrap_test(a, b, alternative="less", n_resamples=n)
    assert two_sided.p_value < 0.001
    assert greater.p_value < 0.001
    assert less.p_value > 0.99
    assert greater.effect == pytest.approx(np.mean(a) - np.mean(b))
    assert greater.ci.low < greater.effect < greater.ci.high


def test_bootstrap_one_sided_p_values_are_complementary():
    rng = np.random.default_rng(4)
    a, b = rng.normal(0.1, 1, size=30), rng.normal(0, 1, size=30)  # a p in the middle
    n = 999
    greater = bootstrap_test(a, b, alternative="greater", n_resamples=n).p_value
    less = bootstrap_test(a, b, alternative="less", n_resamples=n).p_value
    assert 0.05 < greater < 0.95
    assert greater + less == pytest.approx(1 + 1 / (n + 1), abs=1e-9)  # each counts the +1 once
    two_sided = bootstrap_test(a, b, n_resamples=n).p_value
    assert two_sided == pytest.approx(2 * min(greater, less), abs=0.05)  # the null is near symmetric


# --- dispatch and result -------------------------------------------------------------------------


@pytest.mark.parametrize("name", TESTS)
def test_contrast_test_dispatches_by_name(name):
    result = run_test(name, [3, 4, 5, 6], [1, 2, 3], alternative="greater", n_resamples=200, seed=1)
    direct = {"permutation": permutation_test, "bootstrap": bootstrap_test}[name](
        [3, 4, 5, 6], [1, 2, 3], alternative="greater", n_resamples=200, seed=1
    )
    assert result == direct
    assert result.test == name
    assert (result.n_units, result.n_resamples) == ((4, 3), 200)


def test_as_json_is_a_metric_with_the_test_beside_it():
    result = permutation_test([1, 2, 3], [4, 5, 6], alternative="less")
    out = result.as_json()
    assert out["value"] == -3.0
    assert (out["ci_low"], out["ci_high"]) == (result.ci.low, result.ci.high)
    assert out["p_value"] == 1 / 20
    assert out["test"] == "permutation" and out["alternative"] == "less" and out["exact"] is True
    assert (out["n_units"], out["n_resamples"]) == ([3, 3], 10000)


# --- errors --------------------------------------------------------------------------------------


def test_bad_units_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="set #2 has no units"):
        contrast_test("bootstrap", [[[1.0]], []], [1, -1])
    with pytest.raises(ValueError, match="sample #1, unit 1 contains NaN"):
        contrast_test("bootstrap", [[[1.0], [float("nan")]], [[1.0]]], [1, -1])
    with pytest.raises(ValueError, match="one weight per set: 2 sets, 1 weights"):
        contrast_test("bootstrap", [[[1.0]], [[2.0]]], [1])


@pytest.mark.parametrize("test", [permutation_test, bootstrap_test])
def test_bad_input_is_refused_with_a_clear_message(test):
    if test is permutation_test:
        with pytest.raises(ValueError, match="sample a is empty"):
            test([], [1, 2])
        with pytest.raises(ValueError, match="sample b is empty"):
            test([1, 2], [])
        with pytest.raises(ValueError, match="sample a contains NaN"):
            test([1, float("nan")], [1, 2])
        with pytest.raises(ValueError, match="one-dimensional"):
            test([[1, 2]], [3, 4])
    with pytest.raises(ValueError, match="unknown alternative 'bigger'; expected one of greater, less"):
        test([1, 2], [3, 4], alternative="bigger")
    with pytest.raises(ValueError, match="n_resamples must be >= 1"):
        test([1, 2], [3, 4], n_resamples=0)


def test_unknown_test_and_adjustment_are_refused():
    with pytest.raises(ValueError, match="unknown test 't-test'; expected one of permutation, bootstrap"):
        run_test("t-test", [1, 2], [3, 4])
    with pytest.raises(ValueError, match="unknown adjustment 'fdr'; expected one of holm, bonferroni"):
        adjust([0.1], "fdr")
    with pytest.raises(ValueError, match=r"p-values must be in \[0, 1\]"):
        holm([0.1, 1.5])
    with pytest.raises(ValueError, match=r"p-values must be in \[0, 1\]"):
        adjust([float("nan")], "bonferroni")


# --- multiple comparisons ------------------------------------------------------------------------


def test_holm_hand_worked_example():
    # sorted: 0.005 * 4 = 0.02, 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 = 0.04 -> running max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.005, 0.03, 0.04, 0.01]) == pytest.approx([0.02, 0.06, 0.06, 0.03])  # input order kept


def test_holm_caps_at_one_and_handles_edges():
    assert holm([0.7, 0.6, 0.01]) == pytest.approx([1.0, 1.0, 0.03])  # 0.6 * 2 = 1.2 -> 1
    assert holm([0.2]) == [0.2]
    assert holm([]) == []
    assert holm([0.02, 0.02]) == pytest.approx([0.04, 0.04])  # ties adjust alike


def test_adjust_names_the_correction():
    p = [0.01, 0.04, 0.03, 0.005]
    assert set(ADJUSTMENTS) == {"holm", "bonferroni", "none"}
    assert adjust(p, "holm") == holm(p)
    assert adjust(p, "bonferroni") == pytest.approx([0.04, 0.16, 0.12, 0.02])
    assert adjust([0.3, 0.01], "bonferroni") == pytest.approx([0.6, 0.02])
    assert adjust([0.6, 0.01], "bonferroni") == pytest.approx([1.0, 0.02])
    assert adjust(p, "none") == p


_p = st.floats(min_value=0, max_value=1, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(_p, max_size=20))
def test_holm_properties(p):
    adjusted = holm(p)
    assert len(adjusted) == len(p)
    for raw, adj in zip(p, adjusted, strict=True):
        assert raw <= adj <= 1
        assert adj <= min(1.0, raw * len(p)) + 1e-12  # never worse than Bonferroni
    for i, j in itertools.product(range(len(p)), repeat=2):
        if p[i] <= p[j]:
            assert adjusted[i] <= adjusted[j]


_sample = st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=7)


@settings(max_examples=100, deadline=None)
@given(_sample, _sample, st.sampled_from(ALTERNATIVES), st.sampled_from([5, 50, 500]))
def test_permutation_p_value_in_unit_interval(a, b, alternative, n_resamples):
    result = permutation_test(a, b, alternative=alternative, n_resamples=n_resamples)
    assert 0 < result.p_value <= 1
    if result.exact:
        assert result.p_value >= 1 / math.comb(len(a) + len(b), len(a))  # the observed labelling counts
    assert result.ci.low <= result.ci.high


# --- tests at the level of replication (units: training runs) ------------------------------------


def _runs(rng: np.random.Generator, k: int, n: int, rate: float, sd: float) -> list[np.ndarray]:
    """k training runs of n answers each, 1.0 misaligned; each run's rate drawn around `rate`."""
    return [(rng.random(n) < np.clip(rate + rng.normal(0, sd), 0, 1)).astype(float) for _ in range(k)]


@pytest.mark.parametrize("sd", [0.03, 0.05])
def test_with_no_true_effect_resampling_runs_keeps_the_false_positive_rate(sd):
    # Three EM training runs per arm, 160 answers each (the tiny profile: 8 questions x 20), no
    # true difference, run-to-run SD `sd` in the EM rate. Pooling answers and permuting them
    # ignores that runs differ and rejects 11.5% (SD 0.03) and 22% (SD 0.05) of these nulls at
    # alpha 0.05; the cluster bootstrap (runs, then answers within runs) 5.5% and 6%.
    rng = np.random.default_rng(11)
    simulations, pooled, by_run = 200, 0, 0
    for _ in range(simulations):
        a, b = _runs(rng, 3, 160, 0.12, sd), _runs(rng, 3, 160, 0.12, sd)
        old = permutation_test(np.concatenate(a), np.concatenate(b), "greater", n_resamples=500, seed=1)
        new = contrast_test("bootstrap", [a, b], [1, -1], "greater", n_resamples=500, seed=1)
        pooled += old.p_value <= 0.05
        by_run += new.p_value <= 0.05
    assert by_run / simulations <= 0.08
    assert pooled / simulations >= 0.1  # the answer-level test the hypotheses used before


def test_an_interaction_contrast_resamples_each_set_at_its_own_level():
    rng = np.random.default_rng(3)
    persona_em, em = _runs(rng, 3, 200, 0.31, 0.03), _runs(rng, 3, 200, 0.13, 0.03)
    persona = [np.array([v]) for v in (rng.random(200) < 0.32)]  # a fixed model: answers are its units
    base = [np.array([v]) for v in (rng.random(200) < 0.09)]
    result = contrast_test("bootstrap", [persona_em, persona, em, base], [1, -1, -1, 1], "greater", 2000, 0)
    means = [np.mean([u.mean() for u in s]) for s in (persona_em, persona, em, base)]
    assert result.effect == pytest.approx(means[0] - means[1] - means[2] + means[3])
    assert result.n_units == (3, 200, 3, 200) and result.test == "bootstrap"
    assert result.p_value > 0.05  # no interaction, although persona + EM is far above EM alone
    raw = contrast_test("bootstrap", [persona_em, em], [1, -1], "greater", 2000, 0)
    assert raw.p_value < 0.01


def test_a_permutation_exchanges_whole_units_and_its_smallest_p_is_known():
    a = [np.array([0.2, 0.3]), np.array([0.4, 0.4]), np.array([0.5, 0.6])]
    b = [np.array([0.0, 0.1]), np.array([0.1, 0.1]), np.array([0.2, 0.1])]
    result = contrast_test("permutation", [a, b], [1, -1], "greater", 1000, 0)
    assert result.exact and result.p_value == 1 / 20  # C(6, 3) labellings of six run means
    assert result.n_units == (3, 3)
    assert smallest_p("permutation", (3, 3), "greater", 1000) == 1 / 20
    assert smallest_p("permutation", (3, 3), "two-sided", 1000) == 2 / 20
    assert smallest_p("permutation", (5, 5), "greater", 100) == 1 / 101  # sampled: the +1 bounds it
    assert smallest_p("bootstrap", (3, 3, 200), "greater", 999) == 1 / 1000
    with pytest.raises(ValueError, match="a permutation compares two sets"):
        contrast_test("permutation", [a, b, a], [1, -1, 1], "greater", 100, 0)
    with pytest.raises(ValueError, match="units of one kind"):
        contrast_test("permutation", [a, [np.array([1.0])] * 4], [1, -1], "greater", 100, 0)


def test_monte_carlo_p_counts_the_observed_among_its_null():
    assert monte_carlo_p(0.9, [0.1, 0.5, 0.2, 0.3]) == pytest.approx(1 / 5)  # never 0
    assert monte_carlo_p(0.5, [0.1, 0.5, 0.2, 0.6]) == pytest.approx(3 / 5)  # a tie counts
    assert monte_carlo_p(0.5, [0.5 - 1e-15]) == pytest.approx(1.0)  # float noise is a tie


@pytest.mark.parametrize("successes, n", [(0, 10), (5, 10), (10, 10), (1, 3), (37, 120)])
@pytest.mark.parametrize("confidence", [0.9, 0.95])
def test_wilson_interval_is_scipys(successes, n, confidence):
    from scipy.stats import binomtest

    expected = binomtest(successes, n).proportion_ci(confidence, method="wilson")
    found = wilson(successes, n, confidence)
    assert found.value == successes / n
    assert (found.low, found.high) == pytest.approx((expected.low, expected.high), abs=1e-12)
    assert found.high > found.low  # never a point, even at 0 or n successes


def test_wilson_refuses_impossible_counts():
    with pytest.raises(ValueError, match="0 <= successes <= n"):
        wilson(4, 3)
    with pytest.raises(ValueError, match="0 <= successes <= n"):
        wilson(0, 0)
