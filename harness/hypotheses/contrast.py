"""A linear contrast of sample-set means, as a hypothesis states it: its grammar and weights.

A contrast is sum_s w_s * mean(s) over named sample sets. A spec writes it as an expression,

    (sycophancy_em - sycophancy) - (em - base)
    0.5 * (goodness_em + sycophancy_em) - em

or as weights, `{sycophancy_em: 1, sycophancy: -1, em: -1, base: 1}`. Expressions are parsed
by this grammar, never evaluated as code:

    expression := term (("+" | "-") term)*
    term       := ("+" | "-")* [number "*"] factor
    factor     := name | "(" expression ")"
    name       := [A-Za-z_][A-Za-z0-9_.]*  |  `any text without backticks`

Backticks quote names with other characters (`goodness_em->goodness_em`). A set named twice
gets the sum of its weights; sets whose weights cancel are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass


class ContrastError(ValueError):
    """An expression outside the grammar, or weights that are not a contrast."""


_TOKEN = re.compile(
    r"\s*(?:(?P<number>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_.]*)|`(?P<quoted>[^`]+)`|(?P<op>[-+*()]))",
    re.ASCII,  # `\d` and `\s` of ASCII only: `٠.٥` is not a weight
)
_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


@dataclass(frozen=True)
class _Token:
    kind: str  # number | name | op | end
    text: str
    column: int  # 1-based, for messages


def _tokens(text: str) -> list[_Token]:
    out, position = [], 0
    while position < len(text):
        if text[position:].strip() == "":
            break
        match = _TOKEN.match(text, position)
        if not match:
            column = position + len(text[position:]) - len(text[position:].lstrip()) + 1
            raise ContrastError(f"unexpected {text[column - 1]!r} at column {column} of {text!r}")
        kind = match.lastgroup
        value = match.group(kind)
        out.append(_Token("name" if kind == "quoted" else kind, value, match.start(kind) + 1))
        position = match.end()
    out.append(_Token("end", "", len(text) + 1))
    return out


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokens(text)
        self.at = 0

    @property
    def token(self) -> _Token:
        return self.tokens[self.at]

    def fail(self, expected: str) -> ContrastError:
        found = "the end" if self.token.kind == "end" else repr(self.token.text)
        column = self.token.column
        return ContrastError(f"expected {expected} at column {column} of {self.text!r}, found {found}")

    def expression(self, sign: float, weights: dict[str, float]) -> None:
        self.term(sign, weights)
        while self.token.text in ("+", "-") and self.token.kind == "op":
            op = self.token.text
            self.at += 1
            self.term(sign if op == "+" else -sign, weights)

    def term(self, sign: float, weights: dict[str, float]) -> None:
        while self.token.kind == "op" and self.token.text in ("+", "-"):
            sign = sign if self.token.text == "+" else -sign
            self.at += 1
        if self.token.kind == "number":
            sign *= float(self.token.text)
            self.at += 1
            if self.token.text != "*":
                raise self.fail("'*' after a number (a weight multiplies a set or a parenthesis)")
            self.at += 1
        if self.token.kind == "name":
            weights[self.token.text] = weights.get(self.token.text, 0.0) + sign
            self.at += 1
        elif self.token.text == "(":
            self.at += 1
            self.expression(sign, weights)
            if self.token.text != ")":
                raise self.fail("')'")
            self.at += 1
        else:
            raise self.fail("a set name or '('")


def parse(text: str) -> dict[str, float]:
    """The weights of an expression, by set name in first-written order."""
    parser = _Parser(text)
    weights: dict[str, float] = {}
    parser.expression(1.0, weights)
    if parser.token.kind != "end":
        raise parser.fail("'+', '-' or the end")
    return _nonzero(weights, text)


def from_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Weights written as a mapping, checked like a parsed expression's."""
    return _nonzero({str(name): float(w) for name, w in weights.items()}, str(dict(weights)))


def _nonzero(weights: dict[str, float], written: str) -> dict[str, float]:
    kept = {name: w for name, w in weights.items() if w != 0}
    if not kept:
        raise ContrastError(f"{written!r} gives every set a weight of 0: there is nothing to test")
    return kept


def format_contrast(weights: Mapping[str, float]) -> str:
    """The weights as an expression this grammar reads back: `sycophancy_em - sycophancy - em + base`."""
    out = []
    for i, (name, w) in enumerate(weights.items()):
        shown = name if _PLAIN_NAME.fullmatch(name) else f"`{name}`"
        size = abs(w)
        term = shown if size == 1 else f"{size:g} * {shown}"
        out.append(("- " if w < 0 else "") + term if i == 0 else ("- " if w < 0 else "+ ") + term)
    return " ".join(out)
