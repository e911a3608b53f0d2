"""Gates: `metric op value`, optionally `(abort op value)`, on a confidence bound,
`ci_low(metric) op value`, or on a difference of two metrics, `a - b op value` (a finetuned
setting's value less the base's). Parsed by a small scanner; nothing is evaluated as code."""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from harness.spec.errors import Mark

OPS = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}
BOUNDS = ("ci_low", "ci_high")

_TOKEN = re.compile(
    r"\s*(?:(?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_.]*)"
    r"|(?P<op><=|>=|==|!=|<|>)"
    r"|(?P<punct>[()-]))",
    re.ASCII,  # float() would read any Unicode digit ("٠.٥"); a threshold is shown as written
)


class GateSyntaxError(ValueError):
    def __init__(self, message: str, column: int):
        self.column = column  # 1-based, inside the gate text
        super().__init__(message)


@dataclass(frozen=True)
class Gate:
    text: str
    metric: str
    op: str
    threshold: float
    bound: str | None = None  # "ci_low" / "ci_high": gate on a confidence bound
    abort_op: str | None = None
    abort_threshold: float | None = None
    mark: Mark | None = None
    minus: str | None = None  # `metric - minus op threshold`

    @property
    def subject(self) -> str:
        if self.minus:
            return f"{self.metric} - {self.minus}"
        return f"{self.bound}({self.metric})" if self.bound else self.metric

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics the gate reads."""
        return (self.metric, self.minus) if self.minus else (self.metric,)

    @property
    def where(self) -> str:
        return self.mark.short if self.mark else "?"


@dataclass(frozen=True)
class GateResult:
    gate: Gate
    value: float | None
    passed: bool
    aborted: bool = False
    problem: str = ""  # why the gate could not be evaluated, if it could not

    def describe(self) -> str:
        g = self.gate
        if self.problem:
            return f"gate `{g.text}` at {g.where}: {self.problem}"
        verdict = "passed" if self.passed else "ABORTED" if self.aborted else "failed"
        line = f"gate `{g.text}` {verdict}: measured {g.subject} = {_fmt(self.value)}"
        line += f", threshold {g.op} {_fmt(g.threshold)}"
        if self.aborted:
            line += f", abort bound {g.abort_op} {_fmt(g.abort_threshold)}"
        return f"{line}  ({g.where})"


def _fmt(value: float | None) -> str:
    return "None" if value is None else f"{value:.6g}"


def _tokens(text: str) -> list[tuple[str, str, int]]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if match is None:
            column = len(text) - len(text[pos:].lstrip()) + 1  # past leading blanks
            raise GateSyntaxError(f"unexpected character {text[column - 1]!r}", column)
        kind = match.lastgroup
        out.append((kind, match.group(kind), match.start(kind) + 1))
        pos = match.end()
    return out


_FORM = (
    "expected `metric op number` or `metric - metric op number`, optionally followed by `(abort op number)`"
)


def parse_gate(text: str, mark: Mark | None = None) -> Gate:
    """Parse one gate; raises GateSyntaxError naming the column of the problem."""
    if not isinstance(text, str):
        raise GateSyntaxError(f"a gate must be a string, not {type(text).__name__}", 1)
    tokens = _tokens(text)
    pos = 0

    def take(kind: str, what: str, value: str | None = None) -> tuple[str, int]:
        nonlocal pos
        if pos >= len(tokens):
            raise GateSyntaxError(f"{what} expected at end of gate; {_FORM}", len(text) + 1)
        tkind, tvalue, column = tokens[pos]
        if tkind != kind or (value is not None and tvalue != value):
            raise GateSyntaxError(f"{what} expected, found {tvalue!r}; {_FORM}", column)
        pos += 1
        return tvalue, column

    def next_is(value: str) -> bool:
        return pos < len(tokens) and tokens[pos][:2] == ("punct", value)

    name, column = take("name", "metric name")
    bound = minus = None
    if name in BOUNDS and next_is("("):
        take("punct", "'('", "(")
        bound, (name, column) = name, take("name", "metric name")
        if next_is("-"):
            raise GateSyntaxError(
                "a difference of metrics has no confidence bound: gate each metric's bound on its own",
                tokens[pos][2],
            )
        take("punct", "')'", ")")
    elif name in BOUNDS or name == "abort":
        raise GateSyntaxError(f"{name!r} is reserved; {_FORM}", column)
    elif next_is("-"):
        take("punct", "'-'", "-")
        minus, minus_column = take("name", "metric name")
        if minus in BOUNDS or minus == "abort":
            raise GateSyntaxError(f"{minus!r} is reserved; {_FORM}", minus_column)
    op, _ = take("op", "comparison operator (< <= > >= == !=)")
    threshold = _number(*take("number", "number"))
    abort_op = abort_threshold = None
    if pos < len(tokens):
        take("punct", "'(abort ...)' or end of gate", "(")
        take("name", "'abort'", "abort")
        abort_op, abort_column = take("op", "comparison operator (< <= > >= == !=)")
        abort_threshold = _number(*take("number", "number"))
        take("punct", "')'", ")")
        if pos < len(tokens):
            raise GateSyntaxError("unexpected text after the abort bound", tokens[pos][2])
        _check_abort(op, threshold, abort_op, abort_threshold, abort_column)
    return Gate(text, name, op, threshold, bound, abort_op, abort_threshold, mark, minus)


def _number(text: str, column: int) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise GateSyntaxError(f"threshold {text!r} is not a finite number", column)
    return value


def _check_abort(op: str, threshold: float, abort_op: str, abort: float, column: int) -> None:
    """An abort bound must lie beyond the threshold: every aborting value also fails."""
    below, above = ("<", "<="), (">", ">=")
    if not (op in above and abort_op in below or op in below and abort_op in above):
        raise GateSyntaxError(f"abort bound `{abort_op}` must point away from the threshold `{op}`", column)
    if abort_op in ("<=", ">="):
        inside = not OPS[op](abort, threshold)
    else:
        inside = abort <= threshold if abort_op == "<" else abort >= threshold
    if not inside:
        raise GateSyntaxError(
            f"abort bound `{abort_op} {abort:g}` overlaps the passing range `{op} {threshold:g}`",
            column,
        )


def metric_value(metrics: Mapping[str, Any], name: str, bound: str | None) -> float:
    """The number a gate compares; raises LookupError/TypeError with a readable message."""
    if name not in metrics:
        known = ", ".join(sorted(metrics)) or "none"
        raise LookupError(f"metric {name!r} was not produced (produced: {known})")
    value = metrics[name]
    if isinstance(value, Mapping):
        field = bound or "value"
        if field not in value:
            raise LookupError(f"metric {name!r} carries no {field!r}")
        value = value[field]
    elif bound:
        raise LookupError(f"metric {name!r} carries no confidence interval for {bound}()")
    if value is None:
        raise TypeError(f"metric {name!r} is None")
    if isinstance(value, bool):
        value = float(value)
    if not isinstance(value, (int, float)):
        raise TypeError(f"metric {name!r} is not a number: {value!r}")
    if isinstance(value, float) and math.isnan(value):
        raise TypeError(f"metric {name!r} is NaN")
    try:
        return float(value)
    except OverflowError:  # an int beyond float range compares as infinity
        return math.inf if value > 0 else -math.inf


def evaluate(gate: Gate, metrics: Mapping[str, Any]) -> GateResult:
    try:
        value = metric_value(metrics, gate.metric, gate.bound)
        if gate.minus:
            value -= metric_value(metrics, gate.minus, None)
    except (LookupError, TypeError) as exc:
        return GateResult(gate, None, False, problem=str(exc))
    passed = OPS[gate.op](value, gate.threshold)
    aborted = gate.abort_op is not None and OPS[gate.abort_op](value, gate.abort_threshold)
    return GateResult(gate, value, passed, aborted)
