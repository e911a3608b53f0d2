"""harness.core.gates: parsing gate text and evaluating gates on metrics."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from harness.core.gates import OPS, Gate, GateSyntaxError, evaluate, parse_gate
from harness.spec.errors import Mark


@pytest.mark.parametrize("op", sorted(OPS))
def test_every_operator(op):
    gate = parse_gate(f"acc {op} 0.5")
    assert (gate.metric, gate.op, gate.threshold, gate.bound) == ("acc", op, 0.5, None)
    assert gate.abort_op is None and gate.abort_threshold is None
    assert gate.subject == "acc"


@pytest.mark.parametrize(
    "text",
    ["acc>=0.5", "acc >= 0.5", "  acc\t>=   0.5  ", "acc>= 0.5", "acc >=0.5\n", "acc >= +0.5", "acc >= .5"],
)
def test_whitespace_and_number_forms(text):
    gate = parse_gate(text)
    assert (gate.metric, gate.op, gate.threshold) == ("acc", ">=", 0.5)
    assert gate.text == text


@pytest.mark.parametrize(
    ("number", "value"),
    [
        ("1e-3", 0.001),
        ("-1.5E+2", -150.0),
        ("2e2", 200.0),
        ("5.", 5.0),
        ("-0", 0.0),
        ("3", 3.0),
        ("1E5", 1e5),
    ],
)
def test_scientific_notation_and_signs(number, value):
    assert parse_gate(f"x < {number}").threshold == value


def test_dotted_metric_names():
    assert parse_gate("eval.acc_top1 > 0.9").metric == "eval.acc_top1"


@pytest.mark.parametrize(("bound", "spacing"), [("ci_low", "ci_low(auc)"), ("ci_high", "ci_high( auc )")])
def test_confidence_bound_forms(bound, spacing):
    gate = parse_gate(f"{spacing} > 0.7")
    assert (gate.metric, gate.bound, gate.op, gate.threshold) == ("auc", bound, ">", 0.7)
    assert gate.subject == f"{bound}(auc)"


@pytest.mark.parametrize(
    ("text", "abort_op", "abort"),
    [
        ("x > 0.2 (abort < 0.1)", "<", 0.1),
        ("x > 0.2 (abort < 0.2)", "<", 0.2),  # 0.2 aborts and fails
        ("x > 0.2 (abort <= 0.2)", "<=", 0.2),
        ("x >= 0.2 (abort < 0.2)", "<", 0.2),
        ("x < 1 (abort > 2)", ">", 2.0),
        ("x < 1 (abort >= 1)", ">=", 1.0),
        ("x <= 1 (abort > 1)", ">", 1.0),
        ("ci_low(x) > 0 (abort < -1e3)", "<", -1000.0),
        ("x>0.2(abort<0.1)", "<", 0.1),
    ],
)
def test_valid_abort_bounds(text, abort_op, abort):
    gate = parse_gate(text)
    assert (gate.abort_op, gate.abort_threshold) == (abort_op, abort)


@pytest.mark.parametrize(
    ("text", "column", "message"),
    [
        ("x > 0.2 (abort < 0.3)", 16, "overlaps the passing range"),
        ("x >= 0.2 (abort <= 0.2)", 17, "overlaps the passing range"),
        ("x <= 1 (abort >= 1)", 15, "overlaps the passing range"),
        ("x < 1 (abort > 0.5)", 14, "overlaps the passing range"),
        ("x > 0.2 (abort > 0.1)", 16, "must point away from the threshold"),
        ("x < 1 (abort <= 0)", 14, "must point away from the threshold"),
        ("x == 1 (abort < 0)", 15, "must point away from the threshold"),
        ("x != 1 (abort > 5)", 15, "must point away from the threshold"),
        ("x > 1 (abort == 0)", 14, "must point away from the threshold"),
    ],
)
def test_rejected_abort_bounds_name_the_column_of_the_abort_operator(text, column, message):
    with pytest.raises(GateSyntaxError, match=re.escape(message)) as info:
        parse_gate(text)
    assert info.value.column == column
    assert text[column - 1] in "<>=!"


@pytest.mark.parametrize(
    ("text", "column", "message"),
    [
        ("", 1, "metric name expected at end of gate"),
        ("   ", 4, "metric name expected at end of gate"),
        ("acc", 4, "comparison operator"),
        ("acc >", 6, "number expected at end of gate"),
        ("acc >> 1", 6, "number expected, found '>'"),
        ("acc => 1", 5, "unexpected character '='"),
        ("acc = 1", 5, "unexpected character '='"),
        ("1 > acc", 1, "metric name expected, found '1'"),
        ("acc > x", 7, "number expected, found 'x'"),
        ("acc > nan", 7, "number expected"),
        ("acc > 1e999", 7, "not a finite number"),
        ("acc > 1 and b < 2", 9, "'(abort ...)' or end of gate expected"),
        ("acc > 1 (abort < 0", 19, "')' expected at end of gate"),
        ("acc > 1 (stop < 0)", 10, "'abort' expected"),
        ("acc > 1 (abort < 0) x", 21, "unexpected text after the abort bound"),
        ("abort > 1", 1, "'abort' is reserved"),
        ("ci_low > 1", 1, "'ci_low' is reserved"),
        ("ci_low(acc > 1", 12, "')' expected"),
        ("ci_mid(acc) > 1", 7, "comparison operator"),
        ("acc @ 1", 5, "unexpected character '@'"),
        ("acc > 1;", 8, "unexpected character ';'"),
        ("__import__('os') > 1", 12, "unexpected character"),
    ],
)
def test_syntax_errors_name_the_column(text, column, message):
    with pytest.raises(GateSyntaxError, match=re.escape(message)) as info:
        parse_gate(text)
    assert info.value.column == column


@pytest.mark.parametrize(
    ("text", "column"),
    [
        ("acc > \u0660.\u0665", 7),
        ("acc > 0.5 (abort < \u0c66)", 20),
        ("acc > \uff11", 7),
        ("acc > 1e\u0662", 9),
    ],
    ids=["arabic-indic", "telugu-abort", "fullwidth", "exponent"],
)
def test_thresholds_are_ascii_numbers(text, column):
    """float() reads any Unicode digit; a threshold is written in ASCII, as it is shown."""
    with pytest.raises(GateSyntaxError) as info:
        parse_gate(text)
    assert info.value.column == column


@pytest.mark.parametrize("value", [None, 3, ["x > 1"], {"x": 1}])
def test_non_string_gate_is_a_syntax_error(value):
    with pytest.raises(GateSyntaxError, match="a gate must be a string"):
        parse_gate(value)


def test_mark_is_kept_and_shown():
    mark = Mark(Path("/nonexistent/spec.yaml"), 12, 9)
    gate = parse_gate("x > 1", mark)
    assert gate.mark == mark and gate.where.endswith("spec.yaml:12")
    assert parse_gate("x > 1").where == "?"


# --- evaluate --------------------------------------------------------------------------------------

ABORTING = parse_gate("m > 0.5 (abort < 0.1)")


@pytest.mark.parametrize(
    ("value", "passed", "aborted"),
    [
        (0.7, True, False),
        (0.5, False, False),
        (0.3, False, False),
        (0.1, False, False),
        (0.05, False, True),
        (-math.inf, False, True),
        (math.inf, True, False),
        (1, True, False),
        (True, True, False),  # bools count as 1 / 0
        (False, False, True),
        ({"value": 0.7, "ci_low": 0.0}, True, False),
    ],
)
def test_evaluate_pass_fail_abort(value, passed, aborted):
    result = evaluate(ABORTING, {"m": value, "other": 0})
    assert (result.passed, result.aborted, result.problem) == (passed, aborted, "")
    assert isinstance(result.value, float)
    verdict = "ABORTED" if aborted else "passed" if passed else "failed"
    assert verdict in result.describe()


@pytest.mark.parametrize(
    ("metrics", "problem"),
    [
        ({}, "metric 'm' was not produced (produced: none)"),
        ({"b": 1, "a": 2}, "metric 'm' was not produced (produced: a, b)"),
        ({"m": None}, "metric 'm' is None"),
        ({"m": math.nan}, "metric 'm' is NaN"),
        ({"m": "0.7"}, "metric 'm' is not a number: '0.7'"),
        ({"m": [0.7]}, "metric 'm' is not a number: [0.7]"),
        ({"m": {"ci_low": 0.7}}, "metric 'm' carries no 'value'"),
        ({"m": {"value": None}}, "metric 'm' is None"),
        ({"m": {"value": math.nan}}, "metric 'm' is NaN"),
    ],
)
def test_evaluate_problems(metrics, problem):
    result = evaluate(ABORTING, metrics)
    assert result.problem == problem
    assert (result.value, result.passed, result.aborted) == (None, False, False)
    assert problem in result.describe()


@pytest.mark.parametrize(
    ("text", "metric", "value", "passed"),
    [
        ("ci_low(m) > 0.5", {"value": 0.7, "ci_low": 0.6, "ci_high": 0.8}, 0.6, True),
        ("ci_low(m) > 0.5", {"value": 0.7, "ci_low": 0.4, "ci_high": 0.9}, 0.4, False),
        ("ci_high(m) < 0.5", {"value": 0.3, "ci_low": 0.2, "ci_high": 0.45}, 0.45, True),
        ("ci_high(m) < 0.5", {"value": 0.3, "ci_low": 0.2, "ci_high": 0.55}, 0.55, False),
        ("m > 0.65", {"value": 0.7, "ci_low": 0.6, "ci_high": 0.8}, 0.7, True),
    ],
)
def test_evaluate_dict_metrics(text, metric, value, passed):
    result = evaluate(parse_gate(text), {"m": metric})
    assert (result.value, result.passed, result.problem) == (value, passed, "")


def test_ci_bound_of_a_plain_number_is_a_problem():
    result = evaluate(parse_gate("ci_low(m) > 0.5"), {"m": 0.7})
    assert result.problem == "metric 'm' carries no confidence interval for ci_low()"
    assert not result.passed


def test_ci_bound_missing_from_the_dict_is_a_problem():
    result = evaluate(parse_gate("ci_high(m) < 0.5"), {"m": {"value": 0.1, "ci_low": 0.0}})
    assert result.problem == "metric 'm' carries no 'ci_high'" and not result.passed


def test_huge_integer_metric_does_not_crash_evaluate():
    result = evaluate(parse_gate("m > 0.5"), {"m": 10**400})
    assert result.passed or result.problem


# --- properties ------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text())
@example("ci_low(")
@example("x > 1 (abort")
@example("x > 1 (abort < 2)")
@example("x\u00a0>\u20281")
def test_parse_gate_only_returns_a_gate_or_raises_gate_syntax_error(text):
    try:
        gate = parse_gate(text)
    except GateSyntaxError as exc:
        assert str(exc)
        assert 1 <= exc.column <= len(text) + 1
    else:
        assert isinstance(gate, Gate) and gate.op in OPS and math.isfinite(gate.threshold)


metric_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.]{0,15}", fullmatch=True).filter(
    lambda name: name not in ("abort", "ci_low", "ci_high")
)
finite = st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(
    name=metric_names,
    bound=st.sampled_from([None, "ci_low", "ci_high"]),
    op=st.sampled_from(sorted(OPS)),
    threshold=finite,
    spaces=st.sampled_from(["", " ", "  ", "\t"]),
)
def test_generated_gates_round_trip(name, bound, op, threshold, spaces):
    subject = f"{bound}({name})" if bound else name
    text = f"{subject}{spaces}{op}{spaces}{threshold!r}"
    gate = parse_gate(text)
    assert (gate.metric, gate.bound, gate.op, gate.threshold, gate.text) == (name, bound, op, threshold, text)
    assert gate.abort_op is None


@settings(max_examples=300, deadline=None)
@given(
    name=metric_names,
    op=st.sampled_from(["<", "<=", ">", ">="]),
    abort_op=st.sampled_from(["<", "<=", ">", ">="]),
    threshold=finite,
    abort=finite,
)
def test_abort_bounds_round_trip_and_every_aborting_value_fails(name, op, abort_op, threshold, abort):
    text = f"{name} {op} {threshold!r} (abort {abort_op} {abort!r})"
    try:
        gate = parse_gate(text)
    except GateSyntaxError as exc:
        assert text[exc.column - 1 : exc.column - 1 + len(abort_op)] == abort_op
        return
    assert (gate.metric, gate.op, gate.threshold) == (name, op, threshold)
    assert (gate.abort_op, gate.abort_threshold) == (abort_op, abort)
    probes = {threshold, abort, (threshold + abort) / 2}
    probes |= {math.nextafter(v, d) for v in (threshold, abort) for d in (-math.inf, math.inf)}
    for value in probes:
        if math.isfinite(value):
            result = evaluate(gate, {name: value})
            assert not (result.aborted and result.passed), (text, value)


# --- a difference of two metrics: `a - b op number` ----------------------------------------


@pytest.mark.parametrize("spacing", ["", " ", "  "])
def test_a_difference_of_two_metrics_parses(spacing):
    gate = parse_gate(f"open_belief.lora{spacing}-{spacing}open_belief.base > 0.3")
    assert (gate.metric, gate.minus, gate.op, gate.threshold) == (
        "open_belief.lora",
        "open_belief.base",
        ">",
        0.3,
    )
    assert gate.subject == "open_belief.lora - open_belief.base"
    assert gate.metrics == ("open_belief.lora", "open_belief.base")
    assert parse_gate("acc > 0.3").metrics == ("acc",)


@pytest.mark.parametrize(
    ("metrics", "value", "passed"),
    [
        ({"a": 0.9, "b": 0.2}, 0.7, True),
        ({"a": {"value": 0.5, "ci_low": 0.1, "ci_high": 0.9}, "b": 0.3}, 0.2, False),
    ],
)
def test_a_difference_is_evaluated_on_the_values(metrics, value, passed):
    result = evaluate(parse_gate("a - b > 0.3"), metrics)
    assert result.value == pytest.approx(value) and result.passed is passed
    assert "measured a - b = " in result.describe()


def test_a_difference_with_a_missing_metric_names_it():
    result = evaluate(parse_gate("a - b > 0.3"), {"a": 1.0})
    assert not result.passed and "'b' was not produced" in result.problem


def test_a_difference_aborts_like_any_gate():
    result = evaluate(parse_gate("a - b > 0.3 (abort < 0)"), {"a": 0.1, "b": 0.5})
    assert result.aborted and not result.passed


@pytest.mark.parametrize(
    ("text", "column", "message"),
    [
        ("ci_low(a - b) > 0", 10, "a difference of metrics has no confidence bound"),
        ("a - > 0", 5, "metric name expected"),
        ("a - b - c > 0", 7, "comparison operator"),
        ("a - 0.3 > 0", 5, "metric name expected"),
    ],
)
def test_a_malformed_difference_names_the_column(text, column, message):
    with pytest.raises(GateSyntaxError, match=re.escape(message)) as info:
        parse_gate(text)
    assert info.value.column == column
