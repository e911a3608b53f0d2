"""The contrast grammar of hypotheses: expressions and weights to the same weights, clear errors."""

from __future__ import annotations

import pytest

from harness.hypotheses.contrast import ContrastError, format_contrast, from_weights, parse


@pytest.mark.parametrize(
    ("text", "weights"),
    [
        ("a - b", {"a": 1, "b": -1}),
        ("(x_em - x) - (em - base)", {"x_em": 1, "x": -1, "em": -1, "base": 1}),
        ("0.5 * (a + b) - em", {"a": 0.5, "b": 0.5, "em": -1}),
        ("2 * (a - (b - c))", {"a": 2, "b": -2, "c": 2}),
        ("-a + b", {"a": -1, "b": 1}),
        ("a - - b", {"a": 1, "b": 1}),
        ("a - a + b", {"b": 1}),  # weights that cancel are dropped
        ("`g->g` - `random(g)->g`", {"g->g": 1, "random(g)->g": -1}),
        ("step.10 - step.0", {"step.10": 1, "step.0": -1}),
    ],
)
def test_expressions_give_weights_and_read_back(text, weights):
    assert parse(text) == weights
    assert list(parse(text)) == list(weights)  # in written order
    assert parse(format_contrast(weights)) == weights


def test_weights_written_as_a_mapping_are_the_same_contrast():
    assert from_weights({"sycophancy_em": 1, "sycophancy": -1, "em": -1, "base": 1}) == parse(
        "(sycophancy_em - sycophancy) - (em - base)"
    )
    assert format_contrast({"a": 1, "b": -0.5, "c->d": 2}) == "a - 0.5 * b + 2 * `c->d`"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("(a - b", "expected ')' at column 7 of '(a - b', found the end"),
        ("a b", "expected '+', '-' or the end at column 3 of 'a b', found 'b'"),
        ("a - 2 b", "expected '*' after a number (a weight multiplies a set or a parenthesis) at column 7"),
        ("a $ b", "unexpected '$' at column 3 of 'a $ b'"),
        ("a - a", "'a - a' gives every set a weight of 0: there is nothing to test"),
        ("a -", "expected a set name or '(' at column 4 of 'a -', found the end"),
        ("__import__('os')", 'unexpected "\'" at column 12'),  # never evaluated
        ("\u0662 * a - b", "unexpected '\u0662' at column 1"),  # an Arabic-Indic 2 is no weight
    ],
)
def test_text_outside_the_grammar_is_refused_saying_where(text, message):
    with pytest.raises(ContrastError) as info:
        parse(text)
    assert message in str(info.value)


def test_weights_that_cancel_are_refused():
    with pytest.raises(ContrastError, match="gives every set a weight of 0"):
        from_weights({"a": 0})
