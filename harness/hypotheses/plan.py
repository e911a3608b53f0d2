"""The `hypotheses:` section of a spec, parsed into a plan: each hypothesis a linear
contrast of named sample sets with its test, direction and alpha (evaluated by
harness.hypotheses.evaluation, locked by harness.hypotheses.lock). It needs no statistics:
the engine reads the plan when it loads an experiment."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from difflib import get_close_matches
from typing import Any

from harness.hypotheses.contrast import ContrastError, format_contrast, from_weights, parse
from harness.spec.errors import Mark, Problem, SpecError
from harness.spec.validate import EXPERIMENT_SCHEMA, dotted, load_schema, with_defaults
from harness.spec.yamlload import Document

# -- the spec section --------------------------------------------------------------------


@dataclass(frozen=True)
class SampleRef:
    stage: str
    samples: str

    def __str__(self) -> str:
        return f"{self.stage}[{self.samples!r}]"


@dataclass(frozen=True)
class Term:
    ref: SampleRef
    weight: float


@dataclass(frozen=True)
class Hypothesis:
    id: str
    claim: str
    metric: str
    terms: tuple[Term, ...]  # the contrast: sum of weight * mean(set)
    test: str
    direction: str
    alpha: float
    n_resamples: int
    confidence: float
    margin: float = 0.0  # the contrast's value under the null: 0, or a non-inferiority bound
    mark: Mark | None = None

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.ref.stage for t in self.terms))

    @property
    def contrast(self) -> str:
        """The contrast as an expression; its sets named `stage.set` when they span stages."""
        if len(self.stages) == 1:
            return f"{self.stages[0]}: " + format_contrast({t.ref.samples: t.weight for t in self.terms})
        return format_contrast({f"{t.ref.stage}.{t.ref.samples}": t.weight for t in self.terms})

    @property
    def where(self) -> str:
        return self.mark.short if self.mark else "?"

    def plan(self) -> dict[str, Any]:
        """What the lock hashes: every setting, defaults included, so writing a default out
        does not change the plan."""
        return {
            "claim": self.claim,
            "metric": self.metric,
            "contrast": [
                {"stage": t.ref.stage, "samples": t.ref.samples, "weight": t.weight} for t in self.terms
            ],
            "test": self.test,
            "direction": self.direction,
            "alpha": self.alpha,
            "n_resamples": self.n_resamples,
            "confidence": self.confidence,
            "margin": self.margin,
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


def parse_plan(
    data: Mapping[str, Any], doc: Document, stages: Iterable[str], seed: int
) -> HypothesisPlan | None:
    """The `hypotheses:` section of a schema-valid spec (None without one), checked against
    its stages: an unknown stage or an id that is also a stage's name is a SpecError at its line."""
    if data.get("hypotheses") is None:
        return None
    schemas = load_schema(EXPERIMENT_SCHEMA)["$defs"]  # the defaults are written in the schema only
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
        if body["margin"] and body["direction"] == "two-sided":
            where = at + ("margin",)
            message = "a margin bounds a one-sided claim: use direction greater or less, or drop the margin"
            problems.append(Problem(message, doc.mark(where), dotted(where)))
        terms, wrong = _terms(body, stages)
        problems += [Problem(message, doc.mark(at + key), dotted(at + key)) for key, message in wrong]
        tests[name] = Hypothesis(
            id=name,
            claim=body["claim"],
            metric=body["metric"],
            terms=terms,
            test=body["test"],
            direction=body["direction"],
            alpha=float(body["alpha"]),
            n_resamples=int(body["n_resamples"]),
            confidence=float(body["confidence"]),
            margin=float(body["margin"]),
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


def _unknown_stage(stage: str, stages: list[str]) -> str:
    hint = get_close_matches(stage, stages, n=1)
    extra = f"did you mean {hint[0]!r}?" if hint else f"stages are: {', '.join(stages)}"
    return f"unknown stage {stage!r}; {extra}"


def _terms(body: Mapping[str, Any], stages: list[str]) -> tuple[tuple[Term, ...], list[tuple[tuple, str]]]:
    """A hypothesis's contrast, from `stage` + `contrast` or from `a` + `b` (a - b), and the problems
    found, each as (key path under the hypothesis, message)."""
    pair, contrast = [k for k in ("a", "b") if k in body], [k for k in ("stage", "contrast") if k in body]
    if pair and contrast:
        return (), [
            (
                (contrast[0],),
                "a hypothesis states either `contrast` over the sets of one `stage`, or "
                "`a` and `b` (the contrast a - b), not both",
            )
        ]
    if not pair and not contrast:
        return (), [
            (
                (),
                "a hypothesis needs a contrast: `stage` and `contrast` (an expression such as "
                "`(x_em - x) - (em - base)` or weights {set: number}), or `a` and `b`",
            )
        ]
    if contrast:
        if len(contrast) < 2:
            missing = "contrast" if "stage" in body else "stage"
            return (), [((contrast[0],), f"`{contrast[0]}` needs `{missing}` beside it")]
        if body["stage"] not in stages:
            return (), [(("stage",), _unknown_stage(body["stage"], stages))]
        try:
            written = body["contrast"]
            weights = parse(written) if isinstance(written, str) else from_weights(written)
        except ContrastError as exc:
            return (), [(("contrast",), str(exc))]
        terms = tuple(Term(SampleRef(body["stage"], name), w) for name, w in weights.items())
    else:
        if len(pair) < 2:
            return (), [((pair[0],), f"`{pair[0]}` needs `{'b' if pair[0] == 'a' else 'a'}` beside it")]
        refs = [SampleRef(body[side]["stage"], body[side]["samples"]) for side in ("a", "b")]
        wrong = [
            ((side, "stage"), _unknown_stage(r.stage, stages))
            for side, r in zip("ab", refs, strict=True)
            if r.stage not in stages
        ]
        if refs[0] == refs[1]:
            wrong.append((("b",), f"a and b are the same sample set {refs[0]}"))
        if wrong:
            return (), wrong
        terms = (Term(refs[0], 1.0), Term(refs[1], -1.0))
    if body["test"] == "permutation" and [t.weight for t in terms] != [1.0, -1.0]:
        weights = ", ".join(f"{t.weight:g}" for t in terms)
        return terms, [
            (
                ("test",),
                "a permutation compares two sets, a - b (weights 1 and -1); for a "
                f"contrast of {len(terms)} sets with weights {weights} use test: bootstrap",
            )
        ]
    return terms, []
