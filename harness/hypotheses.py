"""Pre-registered hypotheses: the `hypotheses:` section of a spec, its lock, and verdicts.

A hypothesis compares two named sample sets, each read from the `samples.json` at the top
of a stage's artifact directory (`{"<name>": [numbers, ...], ...}`), with the test, the
direction and the alpha written in the spec. The p-values of every hypothesis of the run
(the family) are adjusted together (Holm by default), then each gets a verdict:

- supported:    adjusted p <= alpha and the effect points the claimed way;
- refuted:      one-sided claim whose effect CI lies entirely on the wrong side of 0;
- inconclusive: anything else.

The analysis plan (the resolved section with its defaults, and the seed that draws the
resamples) is hashed; `pytest SPEC --lock-hypotheses` records the hash beside the spec in
`<stem>.lock.json`. A run is pre-registered only when that lock exists for its profile, its
hash matches, and the samples tested were produced after it; otherwise it is exploratory,
and every report says why.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from difflib import get_close_matches
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from harness import stats
from harness.graph import canonical_json
from harness.prereg import (
    HypothesisError,
    Registration,
    check_produced_after_lock,
    registration,
)
from harness.spec.errors import Mark, Problem, SpecError
from harness.spec.validate import EXPERIMENT_SCHEMA, dotted, with_defaults
from harness.spec.yamlload import Document
from harness.store import read_json

SAMPLES_FILE = "samples.json"
SUPPORTED, REFUTED, INCONCLUSIVE = "supported", "refuted", "inconclusive"
UNTESTED, ERROR = "untested", "error"  # a stage it needs did not finish; its samples are unusable
CLAIMS = {"greater": "mean a > mean b", "less": "mean a < mean b", "two-sided": "mean a != mean b"}


# -- the spec section --------------------------------------------------------------------


@dataclass(frozen=True)
class SampleRef:
    stage: str
    samples: str

    def __str__(self) -> str:
        return f"{self.stage}[{self.samples!r}]"


@dataclass(frozen=True)
class Hypothesis:
    id: str
    claim: str
    metric: str
    a: SampleRef
    b: SampleRef
    test: str
    direction: str
    alpha: float
    n_resamples: int
    confidence: float
    mark: Mark | None = None

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.a.stage, self.b.stage)))

    @property
    def where(self) -> str:
        return self.mark.short if self.mark else "?"

    def plan(self) -> dict[str, Any]:
        """What the lock hashes: every setting, defaults included, so writing a default out
        does not change the plan."""
        return {
            "claim": self.claim,
            "metric": self.metric,
            "a": {"stage": self.a.stage, "samples": self.a.samples},
            "b": {"stage": self.b.stage, "samples": self.b.samples},
            "test": self.test,
            "direction": self.direction,
            "alpha": self.alpha,
            "n_resamples": self.n_resamples,
            "confidence": self.confidence,
        }


@dataclass(frozen=True)
class HypothesisPlan:
    correction: str
    on_inconclusive: str
    on_refuted: str
    tests: dict[str, Hypothesis]  # in written order
    seed: int  # draws the resamples of every test
    mark: Mark | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "correction": self.correction,
            "on_inconclusive": self.on_inconclusive,
            "on_refuted": self.on_refuted,
            "seed": self.seed,
            "tests": {name: h.plan() for name, h in self.tests.items()},
        }

    @property
    def digest(self) -> str:
        return hashlib.sha256(canonical_json(self.as_json()).encode()).hexdigest()


def parse_plan(
    data: Mapping[str, Any], doc: Document, stages: Iterable[str], seed: int
) -> HypothesisPlan | None:
    """The `hypotheses:` section of a schema-valid spec (None without one), checked against
    its stages: an unknown stage or an id that is also a stage's name is a SpecError at its line."""
    if data.get("hypotheses") is None:
        return None
    schemas = _schemas()  # the defaults are written in the schema only
    section = with_defaults(data["hypotheses"], schemas["hypotheses"])
    stages = list(stages)
    problems: list[Problem] = []
    tests: dict[str, Hypothesis] = {}
    for name, body in section["tests"].items():
        body = with_defaults(body, schemas["hypothesis"])
        at = ("hypotheses", "tests", name)
        if name in stages:
            problems.append(
                Problem(
                    f"hypothesis {name!r} has the name of a stage; a hypothesis is a pytest item of "
                    "its own and needs a name of its own",
                    doc.mark(at),
                    dotted(at),
                )
            )
        refs = {}
        for side in ("a", "b"):
            ref = SampleRef(body[side]["stage"], body[side]["samples"])
            refs[side] = ref
            if ref.stage not in stages:
                hint = get_close_matches(ref.stage, stages, n=1)
                extra = f"did you mean {hint[0]!r}?" if hint else f"stages are: {', '.join(stages)}"
                path = at + (side, "stage")
                problems.append(
                    Problem(f"unknown stage {ref.stage!r}; {extra}", doc.mark(path), dotted(path))
                )
        if refs["a"] == refs["b"]:
            path = at + ("b",)
            problems.append(
                Problem(f"a and b are the same sample set {refs['a']}", doc.mark(path), dotted(path))
            )
        tests[name] = Hypothesis(
            id=name,
            claim=body["claim"],
            metric=body["metric"],
            a=refs["a"],
            b=refs["b"],
            test=body["test"],
            direction=body["direction"],
            alpha=float(body["alpha"]),
            n_resamples=int(body["n_resamples"]),
            confidence=float(body["confidence"]),
            mark=doc.mark(at),
        )
    if problems:
        raise SpecError(problems)
    return HypothesisPlan(
        correction=section["correction"],
        on_inconclusive=section["on_inconclusive"],
        on_refuted=section["on_refuted"],
        tests=tests,
        seed=seed,
        mark=doc.mark(("hypotheses",)),
    )


@cache
def _schemas() -> dict[str, Any]:
    return json.loads(EXPERIMENT_SCHEMA.read_text(encoding="utf-8"))["$defs"]


# -- tests and verdicts ------------------------------------------------------------------


@dataclass
class Evaluation:
    hypothesis: Hypothesis
    verdict: str  # supported | refuted | inconclusive | untested | error
    why: str
    result: stats.TestResult | None = None
    mean_a: float | None = None
    mean_b: float | None = None
    p_adjusted: float | None = None
    correction: str = "none"
    family_size: int = 1

    def outcome(self, plan: HypothesisPlan) -> str:
        """The pytest outcome: passed | failed | skipped."""
        if self.verdict == SUPPORTED:
            return "passed"
        if self.verdict == REFUTED:
            return "passed" if plan.on_refuted == "report" else "failed"
        if self.verdict == INCONCLUSIVE:
            return {"fail": "failed", "skip": "skipped", "pass": "passed"}[plan.on_inconclusive]
        return "skipped" if self.verdict == UNTESTED else "failed"

    def _effect(self) -> str:
        r, confidence = self.result, self.hypothesis.confidence
        return f"effect a - b = {_num(r.effect)}, {confidence:.0%} CI [{_num(r.ci.low)}, {_num(r.ci.high)}]"

    def _p(self) -> str:
        adjusted = f"{self.correction}-adjusted p = {_num(self.p_adjusted)}"
        return f"p = {_num(self.result.p_value)}, {adjusted}, alpha = {self.hypothesis.alpha:g}"

    def describe(self, registration: Registration) -> str:
        """The verdict with everything it rests on, for failure messages."""
        h, r = self.hypothesis, self.result
        lines = [f"hypothesis {h.id} ({h.where}) {self.verdict.upper()} [{registration.status}]: {h.claim}"]
        if r is not None:
            exact = " (exact)" if r.exact else ""
            test = f"{h.test} test{exact}, claimed {h.direction} ({CLAIMS[h.direction]})"
            lines += [
                f"  {h.metric}: mean a = {_num(self.mean_a)} ({h.a}, n={r.n_a}), "
                f"mean b = {_num(self.mean_b)} ({h.b}, n={r.n_b})",
                f"  {self._effect()}",
                f"  {test}, {self.family_size} hypotheses: {self._p()}",
            ]
        lines.append(f"  verdict: {self.verdict}: {self.why}")
        lines.append(f"  this run is {registration.status}: {registration.reason}")
        return "\n".join(lines)

    def summary(self, registration: Registration) -> str:
        """The same on one line, for skip reasons."""
        h = self.hypothesis
        text = f"hypothesis {h.id} {self.verdict} [{registration.status}]: {h.claim}"
        if self.result is not None:
            text += f"; {self._effect()}; {self._p()}"
        return f"{text}; {self.why}"

    def to_json(self, plan: HypothesisPlan, registration: Registration, index: int) -> dict[str, Any]:
        h, r = self.hypothesis, self.result
        return {
            "id": h.id,
            "index": index,
            "claim": h.claim,
            "metric": h.metric,
            "where": h.where,
            "a": {"stage": h.a.stage, "samples": h.a.samples, "n": r.n_a if r else None, "mean": self.mean_a},
            "b": {"stage": h.b.stage, "samples": h.b.samples, "n": r.n_b if r else None, "mean": self.mean_b},
            "test": h.test,
            "exact": r.exact if r else None,
            "direction": h.direction,
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
            "outcome": self.outcome(plan),
            "status": registration.status,
        }


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def verdict(h: Hypothesis, result: stats.TestResult, p_adjusted: float) -> tuple[str, str]:
    """(verdict, why) from the effect, its CI and the adjusted p-value."""
    ci = f"{h.confidence:.0%} CI [{_num(result.ci.low)}, {_num(result.ci.high)}]"
    significant = p_adjusted <= h.alpha
    sign = {"greater": 1, "less": -1, "two-sided": 0}[h.direction]
    p_text = f"adjusted p {_num(p_adjusted)} {'<=' if significant else '>'} alpha {h.alpha:g}"
    if significant and (sign == 0 or sign * result.effect > 0):
        return SUPPORTED, p_text + (
            "" if sign == 0 else f" and the effect is {'positive' if sign > 0 else 'negative'}"
        )
    if sign > 0 and result.ci.high < 0 or sign < 0 and result.ci.low > 0:
        side = "below" if sign > 0 else "above"
        return REFUTED, f"the {ci} lies entirely {side} 0, against the claimed direction ({h.direction})"
    if significant:  # a one-sided p below alpha with the effect the wrong way: only with ties at 0
        return INCONCLUSIVE, f"{p_text}, but the effect {_num(result.effect)} does not point {h.direction}"
    if sign == 0:
        return INCONCLUSIVE, p_text
    return INCONCLUSIVE, f"{p_text}, and the {ci} does not lie entirely {'below' if sign > 0 else 'above'} 0"


def load_samples(stage_dir: Path | None, ref: SampleRef) -> list[float]:
    """One sample set from a stage's samples.json; HypothesisError says what is wrong."""
    path = Path(stage_dir or ".") / SAMPLES_FILE
    contract = (
        f"a stage backing hypotheses writes {SAMPLES_FILE} at the top of its artifact directory: "
        '{"<sample set>": [numbers, ...], ...}'
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
    values = data[ref.samples]
    if not isinstance(values, list) or not values:
        raise HypothesisError(f"sample set {ref} in {path} must be a non-empty list of numbers")
    bad = next((v for v in values if not isinstance(v, (int, float)) or not math.isfinite(v)), "ok")
    if bad != "ok":
        raise HypothesisError(f"sample set {ref} in {path} holds {bad!r}, not a finite number")
    return [float(v) for v in values]


class HypothesisFamily:
    """Every hypothesis of one run, tested once, when the first hypothesis item asks: the
    correction needs all raw p-values. `resolve(stage)` returns a stage's result (running or
    reusing it), with `outcome`, `reason`, `dir` and `abort` as in harness.execution."""

    def __init__(self, plan: HypothesisPlan, spec_file: Path, profile: str, resolve: Callable[[str], Any]):
        self.plan = plan
        self.spec_file = spec_file
        self.profile = profile
        self.resolve = resolve
        self.registration = registration(plan, spec_file, profile)
        self._evaluations: dict[str, Evaluation] | None = None

    def evaluate(self) -> dict[str, Evaluation]:
        if self._evaluations is None:
            self._evaluations = self._evaluate()
        return self._evaluations

    def _evaluate(self) -> dict[str, Evaluation]:
        out: dict[str, Evaluation] = {}
        samples: dict[SampleRef, list[float]] = {}
        produced: dict[str, str] = {}  # stage -> finished_at of the run whose samples are tested
        for name, h in self.plan.tests.items():
            blocked = self._blocked(h)
            if blocked:
                out[name] = Evaluation(h, UNTESTED, blocked)
                continue
            try:
                for ref in (h.a, h.b):
                    if ref not in samples:
                        result = self.resolve(ref.stage)
                        samples[ref] = load_samples(result.dir, ref)
                        manifest = read_json(Path(result.dir) / "manifest.json") or {}
                        produced[ref.stage] = manifest.get("finished_at", "")
                a, b = samples[h.a], samples[h.b]
                test = stats.run_test(
                    h.test,
                    a,
                    b,
                    alternative=h.direction,
                    n_resamples=h.n_resamples,
                    seed=self.plan.seed,
                    confidence=h.confidence,
                )
            except (HypothesisError, ValueError) as exc:
                out[name] = Evaluation(h, ERROR, str(exc))
                continue
            out[name] = Evaluation(h, INCONCLUSIVE, "", test, float(np.mean(a)), float(np.mean(b)))
        # the family is every hypothesis of the plan: one that could not be tested counts with
        # p = 1, so the others' adjustment stays what the plan promised
        raw = [e.result.p_value if e.result else 1.0 for e in out.values()]
        adjusted = stats.adjust(raw, self.plan.correction)
        for e, p in zip(out.values(), adjusted, strict=True):
            e.correction, e.family_size = self.plan.correction, len(out)
            if e.result is not None:
                e.p_adjusted = p
                e.verdict, e.why = verdict(e.hypothesis, e.result, p)
        self.registration = check_produced_after_lock(self.registration, produced)
        return out

    def _blocked(self, h: Hypothesis) -> str | None:
        for stage in h.stages:
            result = self.resolve(stage)
            if result.outcome == "error":
                return f"stage {stage!r} failed: {result.reason}"
            if result.outcome == "skipped":
                return f"stage {stage!r} was skipped: {result.reason}"
            if result.outcome == "aborted":
                return f"stage {stage!r} aborted: {result.abort.describe()}"
        return None
