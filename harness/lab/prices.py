"""What chat requests to paid providers would cost, for the kinds' `--plan` estimates.

Prices are read from data/model_prices.yaml (USD per million input and output tokens, with
the month they were checked); a model not in it has an unknown price, never a guessed one.
Token counts are `count_tokens`'s (words and punctuation marks): close to a BPE
tokenizer's for English prose, and the same whatever the model."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from harness.core.stage import Estimate

PRICES_FILE = Path(__file__).resolve().parents[2] / "data" / "model_prices.yaml"


@dataclass(frozen=True)
class ChatCalls:
    """`requests` requests to the `provider` mapping's model (`model` overrides its `model`),
    each sending `input_tokens` and getting back at most `output_tokens`."""

    provider: Mapping[str, Any]
    requests: int
    input_tokens: int
    output_tokens: int
    model: str | None = None

    @property
    def paid(self) -> bool:
        return self.provider.get("name") != "offline"


@functools.cache
def _table() -> tuple[str, dict[str, dict[str, float]]]:
    data = yaml.safe_load(PRICES_FILE.read_text(encoding="utf-8"))
    return str(data["as_of"]), data["usd_per_million_tokens"]


def price_of(model: str) -> Mapping[str, float] | None:
    """USD per million `input` and `output` tokens of `model`; None when not in the table."""
    table = _table()[1]
    return table.get(model) or table.get(model.rpartition("/")[2])


def chat_estimate(calls: Iterable[ChatCalls], note: str = "") -> Estimate | None:
    """The requests, tokens and cost of the paid calls among `calls`; None when none is paid
    (an offline provider). The cost is unknown when a model is unnamed or has no price."""
    paid = [c for c in calls if c.paid and c.requests]
    if not paid:
        return None
    cost: float | None = 0.0
    for c in paid:
        price = price_of(c.model or str(c.provider.get("model", "")))
        if price is None or cost is None:
            cost = None
            continue
        cost += (
            c.requests * c.input_tokens * price["input"] + c.requests * c.output_tokens * price["output"]
        ) / 1e6
    priced = f"prices of {_table()[0]}" if cost is not None else ""
    return Estimate(
        requests=sum(c.requests for c in paid),
        input_tokens=sum(c.requests * c.input_tokens for c in paid),
        output_tokens=sum(c.requests * c.output_tokens for c in paid),
        cost_usd=cost,
        note="; ".join(part for part in (note, priced) if part),
    )
