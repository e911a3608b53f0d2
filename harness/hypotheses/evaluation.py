"""Pre-registered hypotheses: the `hypotheses:` section of a spec, its lock, and verdicts.

A hypothesis states a linear contrast of the means of named sample sets (harness.hypotheses.contrast:
`(sycophancy_em - sycophancy) - (em - base)` over the sets of one stage, or `a` and `b`, the
contrast a - b), each set read from the `samples.json` at the top of a stage's artifact
directory (harness.core.samples), with the test, the direction and the alpha written in the spec.
A set's values come in units, the independent replicates they were drawn from (training runs,
say); a set's mean is the mean of its unit means, and the tests resample units, never values
across units (harness.lab.stats.contrast_test). The p-values of every hypothesis of the run (the
family) are adjusted together (Holm by default), then each gets a verdict:

- supported:    adjusted p <= alpha and the effect points the claimed way;
- refuted:      one-sided claim whose effect CI lies entirely on the wrong side of 0;
- inconclusive: anything else, and always when the test has no power: a bootstrap set of
                fewer than stats.MIN_UNITS units, or a smallest attainable p (a permutation of
                3 and 3 training runs cannot go below 0.05, after the family's correction
                perhaps above alpha) that exceeds alpha whatever the data.

The analysis plan (the resolved section with its defaults, and the seed that draws the
resamples) and the recipes of the stages behind it are locked by harness.hypotheses.lock; every
report says whether a run is pre-registered or exploratory, and why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from difflib import get_close_matches
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from harness.core.outcomes import Outcome
from harness.core.samples import SAMPLES_FILE, SampleSet, parse_set
from harness.core.store import read_json
from harness.hypotheses.lock import (
    EXPLORATORY,
    HypothesisError,
    LockBasis,
    Registration,
    registration,
)
from harness.hypotheses.plan import Hypothesis, HypothesisPlan, SampleRef, Term
from harness.lab import stats

SUPPORTED, REFUTED, INCONCLUSIVE = "supported", "refuted", "inconclusive"
UNTESTED, ERROR = "untested", "error"  # a stage it needs did not finish; its samples are unusable
ON_INCONCLUSIVE = {"fail": Outcome.FAILED, "skip": Outcome.SKIPPED, "pass": Outcome.PASSED}  # the policy
CLAIMS = {"greater": "contrast > 0", "less": "contrast < 0", "two-sided": "contrast ≠ 0"}


def _claim(h: Hypothesis) -> str:
    """The alternative as an inequality: against 0, or against the hypothesis's margin."""
    return CLAIMS[h.direction].replace(" 0", f" {_num(h.margin)}") if h.margin else CLAIMS[h.direction]


RESAMPLING = {  # the level each test resamples at, for the reports
    "bootstrap": "each set on its own, in two stages: its units with replacement, then the values "
    "within each drawn unit",
    "permutation": "whole units exchanged between the two sets (their unit means permuted)",
}
SHOWN_UNITS = 12  # a set with at most this many units has each unit's mean in the reports


# -- tests and verdicts ------------------------------------------------------------------


@dataclass(frozen=True)
class SetSummary:
    """One set of a contrast as tested: its weight, its values grouped by unit, its mean."""

    term: Term
    sample: SampleSet

    @cached_property
    def _by_unit(self) -> dict[str, list[float]]:
        return self.sample.by_unit()

    def units(self) -> list[list[float]]:
        return list(self._by_unit.values())

    def unit_means(self) -> dict[str, float]:
        return {unit: float(np.mean(v)) for unit, v in self._by_unit.items()}

    @property
    def mean(self) -> float:
        """The mean of the unit means: every unit weighs the same."""
        return float(np.mean(list(self.unit_means().values())))

    @property
    def n_units(self) -> int:
        return len(self._by_unit)

    def describe(self) -> str:
        s = self.sample
        text = (
            f"{self.term.ref} (weight {self.term.weight:+g}): mean {_num(self.mean)} over {self.n_units} "
            f"unit(s) of level '{s.level}', {len(s.values)} values"
        )
        if self.n_units <= SHOWN_UNITS:
            text += "; unit means " + ", ".join(f"{u}: {_num(m)}" for u, m in self.unit_means().items())
        return text

    def as_json(self) -> dict[str, Any]:
        ref, s = self.term.ref, self.sample
        return {
            "stage": ref.stage,
            "samples": ref.samples,
            "weight": self.term.weight,
            "mean": self.mean,
            "n_values": len(s.values),
            "n_units": self.n_units,
            "level": s.level,
            "unit_means": self.unit_means() if self.n_units <= SHOWN_UNITS else None,
        }


@dataclass
class Evaluation:
    hypothesis: Hypothesis
    verdict: str  # supported | refuted | inconclusive | untested | error
    why: str
    result: stats.TestResult | None = None
    sets: tuple[SetSummary, ...] = ()
    power: str | None = None  # "no power: ..." when no data could make the test significant
    p_adjusted: float | None = None
    correction: str = "none"
    family_size: int = 1

    def outcome(self, plan: HypothesisPlan) -> Outcome:
        """The pytest outcome: passed | failed | skipped."""
        if self.verdict == SUPPORTED:
            return Outcome.PASSED
        if self.verdict == REFUTED:
            return Outcome.PASSED if plan.on_refuted == "report" else Outcome.FAILED
        if self.verdict == INCONCLUSIVE:
            return ON_INCONCLUSIVE[plan.on_inconclusive]
        return Outcome.SKIPPED if self.verdict == UNTESTED else Outcome.FAILED

    def _effect(self) -> str:
        r, confidence = self.result, self.hypothesis.confidence
        return f"effect = {_num(r.effect)}, {confidence:.0%} CI [{_num(r.ci.low)}, {_num(r.ci.high)}]"

    def _p(self) -> str:
        adjusted = f"{self.correction}-adjusted p = {_num(self.p_adjusted)}"
        return f"p = {_num(self.result.p_value)}, {adjusted}, alpha = {self.hypothesis.alpha:g}"

    def _test(self) -> str:
        h = self.hypothesis
        exact = " (exact)" if self.result.exact else ""
        return (
            f"{h.test} test{exact} resampling {RESAMPLING[h.test]}, {h.n_resamples} resamples, "
            f"claimed {h.direction} ({_claim(h)})"
        )

    def describe(self, registration: Registration) -> str:
        """The verdict with everything it rests on, for failure messages."""
        h, r = self.hypothesis, self.result
        lines = [f"hypothesis {h.id} ({h.where}) {self.verdict.upper()} [{registration.status}]: {h.claim}"]
        if r is not None:
            lines += [f"  {h.metric}, contrast {h.contrast}"]
            lines += [f"    {s.describe()}" for s in self.sets]
            lines += [
                f"  {self._effect()}",
                f"  {self._test()}, {self.family_size} hypotheses: {self._p()}",
            ]
        lines.append(f"  verdict: {self.verdict}: {self.why}")
        lines.append(f"  this run is {registration.status}: {registration.reason}")
        return "\n".join(lines)

    def summary(self, registration: Registration) -> str:
        """The same on one line, for skip reasons."""
        h = self.hypothesis
        text = f"hypothesis {h.id} {self.verdict} [{registration.status}]: {h.claim}"
        if self.result is not None:
            one_stage = len(h.stages) == 1
            sets = ", ".join(
                f"{s.term.ref.samples if one_stage else f'{s.term.ref.stage}.{s.term.ref.samples}'} "
                f"{_num(s.mean)} ({s.n_units} x {s.sample.level})"
                for s in self.sets
            )
            text += f"; contrast {h.contrast}; means {sets}; {self._effect()}; {h.test}; {self._p()}"
        return f"{text}; {self.why}"

    def to_json(self, plan: HypothesisPlan, registration: Registration, index: int) -> dict[str, Any]:
        h, r = self.hypothesis, self.result
        return {
            "id": h.id,
            "index": index,
            "claim": h.claim,
            "metric": h.metric,
            "where": h.where,
            "contrast": h.contrast,
            "sets": [s.as_json() for s in self.sets],
            "test": h.test,
            "resampling": RESAMPLING[h.test],
            "power": self.power,
            "exact": r.exact if r else None,
            "direction": h.direction,
            "claimed": _claim(h),
            "margin": h.margin,
            "alpha": h.alpha,
            "confidence": h.confidence,
            "n_resamples": h.n_resamples,
            "effect": r.effect if r else None,
            "ci_low": r.ci.low if r else None,
            "ci_high": r.ci.high if r else None,
            "p_value": r.p_value if r else None,
            "p_adjusted": self.p_adjusted,
            "correction": self.correction,
            "family_size": self.family_size,
            "verdict": self.verdict,
            "why": self.why,
            "outcome": self.outcome(plan).value,  # plain words: xdist sends this to the controller
            "status": registration.status,
        }


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def verdict(
    h: Hypothesis, result: stats.TestResult, p_adjusted: float, power: str | None = None
) -> tuple[str, str]:
    """(verdict, why) from the effect, its CI and the adjusted p-value; inconclusive, saying
    why, when the test has no power."""
    if power:
        return INCONCLUSIVE, power
    ci = f"{h.confidence:.0%} CI [{_num(result.ci.low)}, {_num(result.ci.high)}]"
    significant = p_adjusted <= h.alpha
    sign = {"greater": 1, "less": -1, "two-sided": 0}[h.direction]
    bound = _num(h.margin)  # the contrast's value under the null: 0 or a non-inferiority margin
    p_text = f"adjusted p {_num(p_adjusted)} {'<=' if significant else '>'} alpha {h.alpha:g}"
    if significant and (sign == 0 or sign * (result.effect - h.margin) > 0):
        if sign == 0:
            return SUPPORTED, p_text
        side = f"on the claimed side of {bound}" if h.margin else ("positive" if sign > 0 else "negative")
        return SUPPORTED, f"{p_text} and the effect is {side}"
    if sign > 0 and result.ci.high < h.margin or sign < 0 and result.ci.low > h.margin:
        side = "below" if sign > 0 else "above"
        return (
            REFUTED,
            f"the {ci} lies entirely {side} {bound}, against the claimed direction ({h.direction})",
        )
    if significant:  # a one-sided p below alpha with the effect the wrong way: only with ties at 0
        return INCONCLUSIVE, f"{p_text}, but the effect {_num(result.effect)} does not point {h.direction}"
    if sign == 0:
        return INCONCLUSIVE, p_text
    return (
        INCONCLUSIVE,
        f"{p_text}, and the {ci} does not lie entirely {'below' if sign > 0 else 'above'} {bound}",
    )


def power_note(e: Evaluation, smallest_adjusted: float) -> str | None:
    """ "no power: ..." when no data, however extreme, could make this test significant: a set
    too small for the bootstrap, or a smallest attainable p that the family's correction
    (`smallest_adjusted`: every hypothesis at its smallest p, adjusted) leaves above alpha."""
    h, r = e.hypothesis, e.result
    few = [s for s in e.sets if s.n_units < stats.MIN_UNITS]
    if h.test == "bootstrap" and few:
        sizes = "; ".join(f"{s.term.ref} has {s.n_units} unit(s) of level '{s.sample.level}'" for s in few)
        return (
            f"no power: {sizes}, and a bootstrap needs at least {stats.MIN_UNITS} units per set: "
            "it cannot tell how units vary from fewer"
        )
    if smallest_adjusted <= h.alpha:
        return None
    smallest = stats.smallest_p(h.test, r.n_units, h.direction, h.n_resamples)
    units = " and ".join(f"{s.n_units} x '{s.sample.level}'" for s in e.sets)
    adjusted = (
        f", {_num(smallest_adjusted)} after {e.correction} across {e.family_size} hypotheses"
        if smallest_adjusted > smallest
        else ""
    )
    return (
        f"no power: with {units} units the smallest p a {h.test} test can give ({h.direction}) is "
        f"{_num(smallest)}{adjusted}, above alpha {h.alpha:g}, whatever the data; more units per set "
        "are needed"
    )


def load_samples(stage_dir: Path | None, ref: SampleRef) -> SampleSet:
    """One sample set from a stage's samples.json; HypothesisError says what is wrong."""
    path = Path(stage_dir or ".") / SAMPLES_FILE
    contract = (
        f"a stage backing hypotheses writes {SAMPLES_FILE} at the top of its artifact directory: "
        '{"<sample set>": {"values": [numbers], "units": [names], "level": "..."} or [numbers], ...} '
        "(harness.core.samples)"
    )
    if stage_dir is None or not path.is_file():
        raise HypothesisError(f"stage {ref.stage!r} wrote no {SAMPLES_FILE} (looked for {path}); {contract}")
    data = read_json(path)
    if not isinstance(data, dict):
        raise HypothesisError(f"{path} is not a JSON object of sample sets; {contract}")
    if ref.samples not in data:
        hint = get_close_matches(ref.samples, list(data), n=1)
        extra = f"did you mean {hint[0]!r}? " if hint else ""
        names = ", ".join(repr(n) for n in data) or "none"
        raise HypothesisError(
            f"stage {ref.stage!r} has no sample set {ref.samples!r} in {path}; {extra}it has: {names}"
        )
    try:
        return parse_set(data[ref.samples], ref.samples)
    except ValueError as exc:
        raise HypothesisError(f"{path}: {exc}; {contract}") from None


class HypothesisFamily:
    """Every hypothesis of one run, tested once, when the first hypothesis item asks: the
    correction needs all raw p-values. `resolve(stage)` returns a stage's result (running or
    reusing it), with `outcome`, `reason`, `dir` and `abort` as in harness.core.execution."""

    def __init__(
        self,
        plan: HypothesisPlan,
        basis: LockBasis,
        spec_file: Path,
        profile: str,
        resolve: Callable[[str], Any],
        rehearsal: bool = False,
    ):
        # a rehearsal's models are random: its verdicts are reported, never fail its items
        self.plan = replace(plan, on_inconclusive="pass", on_refuted="report") if rehearsal else plan
        self.spec_file = spec_file
        self.profile = profile
        self.resolve = resolve
        self.basis = basis
        self.registration = (
            Registration(EXPLORATORY, "a rehearsal (--rehearse): random stand-in models, scripted answers")
            if rehearsal
            else registration(basis, spec_file, profile)
        )
        self._evaluations: dict[str, Evaluation] | None = None

    def evaluate(self) -> dict[str, Evaluation]:
        if self._evaluations is None:
            self._evaluations = self._evaluate()
        return self._evaluations

    def _evaluate(self) -> dict[str, Evaluation]:
        out: dict[str, Evaluation] = {}
        samples: dict[SampleRef, SampleSet] = {}
        for name, h in self.plan.tests.items():
            blocked = self._blocked(h)
            if blocked:
                out[name] = Evaluation(h, UNTESTED, blocked)
                continue
            try:
                for ref in (t.ref for t in h.terms):
                    if ref not in samples:
                        result = self.resolve(ref.stage)
                        samples[ref] = load_samples(result.dir, ref)
                sets = tuple(SetSummary(t, samples[t.ref]) for t in h.terms)
                test = stats.contrast_test(
                    h.test,
                    [s.units() for s in sets],
                    [t.weight for t in h.terms],
                    alternative=h.direction,
                    n_resamples=h.n_resamples,
                    seed=self.plan.seed,
                    confidence=h.confidence,
                    margin=h.margin,
                )
            except (HypothesisError, ValueError) as exc:
                out[name] = Evaluation(h, ERROR, str(exc))
                continue
            out[name] = Evaluation(h, INCONCLUSIVE, "", test, sets)
        # the family is every hypothesis of the plan: one that could not be tested counts with
        # p = 1, so the others' adjustment stays what the plan promised
        raw = [e.result.p_value if e.result else 1.0 for e in out.values()]
        adjusted = stats.adjust(raw, self.plan.correction)
        # the same for the smallest p each test could give: where even that stays above alpha, no
        # data could make the hypothesis supported
        floors = stats.adjust([_smallest_p(e) for e in out.values()], self.plan.correction)
        for e, p, floor in zip(out.values(), adjusted, floors, strict=True):
            e.correction, e.family_size = self.plan.correction, len(out)
            if e.result is not None:
                e.p_adjusted = p
                e.power = power_note(e, floor)
                e.verdict, e.why = verdict(e.hypothesis, e.result, p, e.power)
        return out

    def _blocked(self, h: Hypothesis) -> str | None:
        for stage in h.stages:
            result = self.resolve(stage)
            if result.outcome == Outcome.ERROR:
                return f"stage {stage!r} failed: {result.reason}"
            if result.outcome == Outcome.SKIPPED:
                return f"stage {stage!r} was skipped: {result.reason}"
            if result.outcome == Outcome.ABORTED:
                return f"stage {stage!r} aborted: {result.abort.describe()}"
        return None


def _smallest_p(e: Evaluation) -> float:
    h = e.hypothesis
    return stats.smallest_p(h.test, e.result.n_units, h.direction, h.n_resamples) if e.result else 1.0
