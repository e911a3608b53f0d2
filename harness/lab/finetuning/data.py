"""Training rows for a provider's fine-tuning API: checked, normalized, counted and priced
before anything is uploaded.

Formats (each row one JSON object; every problem is reported at its file:line):

    openai    {"messages": [...]} (chat), optionally with "tools" / "parallel_tool_calls":
              roles system, developer, user, assistant, tool; every content a non-empty
              string (an assistant message may carry tool_calls instead); at least one
              assistant message that is trained on (weight not 0); at least 10 rows; no
              example over `max_example_tokens`.
    together  one format for every row: {"text": ...} (continued pretraining), {"messages":
              [...]} (roles system, user, assistant, tool; at least one assistant message),
              or {"prompt": ..., "completion": ...}; at least 1 row.

Fields a provider does not take (a dataset's bookkeeping, e.g. "source") are left out of
the uploaded rows and counted in the report, never sent.

Tokens are an estimate: no tokenizer runs offline (tiktoken downloads its vocabulary at run
time). Each text counts as `harness.lab.documents.count_tokens` (words and punctuation
marks) times TOKEN_MARGIN, plus MESSAGE_OVERHEAD tokens per chat message for its role and
separators. BPE tokenizers make about 1.0-1.3 tokens of each such English token, so the
margin of 1.3 makes the estimate lean high: a budget check errs on the side of refusing.
The provider's own count (trained_tokens), when it reports one, is the real one.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.core.jsonl import jsonl_rows
from harness.core.stage import StageError
from harness.lab.documents import MAX_REPORTED_ROWS, count_tokens

TOKEN_MARGIN = 1.3
MESSAGE_OVERHEAD = 4  # tokens per chat message: role and separators (OpenAI's guide counts 3-4)
MIN_ROWS = {"openai": 10, "together": 1}
# OpenAI's per-example limit for gpt-4o-mini and gpt-4.1 models (65,536 tokens, June 2025);
# Together truncates to the model's max_seq_length instead of refusing
DEFAULT_MAX_EXAMPLE_TOKENS = {"openai": 65_536, "together": None}

# USD per million training tokens, as published on the providers' pricing pages in June 2025.
# Prices change: a spec's `price_per_million_tokens` overrides this table, and a model not in
# it needs one. A model id matches its longest prefix here (gpt-4o-mini-2024-07-18 -> gpt-4o-mini).
PRICES_AS_OF = "2025-06"
PRICES_USD_PER_MILLION = {
    "openai": {
        "gpt-4o-mini": 3.00,
        "gpt-4o": 25.00,
        "gpt-4.1-nano": 1.50,
        "gpt-4.1-mini": 5.00,
        "gpt-4.1": 25.00,
        "gpt-3.5-turbo": 8.00,
    },
    "together": {  # LoRA supervised fine-tuning, by model size
        "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference": 0.48,
        "meta-llama/Meta-Llama-3.1-70B-Instruct-Reference": 2.90,
        "Qwen/Qwen2.5-7B-Instruct": 0.48,
        "Qwen/Qwen2.5-72B-Instruct": 2.90,
    },
}

CHAT_ROLES = {
    "openai": ("system", "developer", "user", "assistant", "tool"),
    "together": ("system", "user", "assistant", "tool"),
}
ROW_FIELDS = {  # format -> fields a row of that format may carry (the first ones required)
    "chat": ("messages", "tools", "parallel_tool_calls"),
    "text": ("text",),
    "instruction": ("prompt", "completion"),
}
MESSAGE_FIELDS = ("role", "content", "name", "weight", "tool_calls", "tool_call_id")
FORMATS = {"openai": ("chat",), "together": ("chat", "text", "instruction")}
EXPECTED = {
    "openai": 'a JSON object {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}',
    "together": 'a JSON object {"text": ...}, {"messages": [...]} or {"prompt": ..., "completion": ...}',
}


@dataclass
class TrainingSet:
    """The rows to upload (only the fields the provider takes) and what they hold."""

    path: Path
    format: str  # chat, text or instruction
    rows: list[dict[str, Any]]
    tokens: list[int]  # estimated tokens of each row
    ignored_fields: dict[str, int] = field(default_factory=dict)  # field -> rows that had it

    @property
    def n_tokens(self) -> int:
        return sum(self.tokens)

    def jsonl(self) -> str:
        """The upload file's text: one row per line, the same for the same rows."""
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in self.rows)


def read_training_set(path: Path, provider: str, max_example_tokens: int | None) -> TrainingSet:
    """Every row of `path` checked against `provider`'s format and limits; a StageError names
    the first bad rows by file:line."""
    rows: list[dict[str, Any]] = []
    tokens: list[int] = []
    ignored: Counter[str] = Counter()
    problems: list[str] = []
    first_format: tuple[str, str] | None = None  # (format, where it was first seen)
    for where, row in jsonl_rows(path, "training data", EXPECTED[provider]):
        form, problem = _row_format(row, provider)
        if problem is None and first_format and form != first_format[0]:
            problem = (
                f"a {form} row, but {first_format[1]} is a {first_format[0]} row: every row has one format"
            )
        if problem is None:
            first_format = first_format or (form, where)
            kept = {name: row[name] for name in ROW_FIELDS[form] if name in row}
            ignored.update(name for name in row if name not in kept)
            problem = _content_problem(kept, form, provider)
        if problem is None:  # only a well-formed row can be measured
            estimate = estimate_tokens(kept)
            if max_example_tokens and estimate > max_example_tokens:
                problem = (
                    f"about {estimate} tokens (estimated), over the limit of {max_example_tokens} per example"
                )
        if problem is not None:
            problems.append(f"{where}: {problem}")
            continue
        rows.append(kept)
        tokens.append(estimate)
    if problems:
        more = len(problems) - MAX_REPORTED_ROWS
        shown = problems[:MAX_REPORTED_ROWS] + ([f"... and {more} more bad rows"] if more > 0 else [])
        raise StageError(f"training data not accepted by {provider}:\n  " + "\n  ".join(shown))
    if len(rows) < MIN_ROWS[provider]:
        raise StageError(
            f"{path}: {len(rows)} training rows; {provider} fine-tuning needs at least {MIN_ROWS[provider]}"
        )
    return TrainingSet(path, first_format[0] if first_format else "chat", rows, tokens, dict(ignored))


def _row_format(row: Any, provider: str) -> tuple[str, str | None]:
    """The row's format, or why it has none the provider takes."""
    if not isinstance(row, dict):
        return "", f"a JSON {type(row).__name__}, not an object; each line is {EXPECTED[provider]}"
    for form in FORMATS[provider]:
        required = ROW_FIELDS[form][: 2 if form == "instruction" else 1]
        if all(name in row for name in required):
            return form, None
    fields = ", ".join(sorted(row)) or "none"
    return "", f"no {' or '.join(repr(ROW_FIELDS[f][0]) for f in FORMATS[provider])} field (it has: {fields})"


def _content_problem(row: Mapping[str, Any], form: str, provider: str) -> str | None:
    if form != "chat":
        for name in ROW_FIELDS[form]:
            if not isinstance(row.get(name), str) or not row[name].strip():
                return f"{name!r} is {json.dumps(row.get(name))[:40]}, not a non-empty string"
        return None
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        return f"'messages' is {json.dumps(messages)[:40]}, not a non-empty list of messages"
    trained = 0
    for index, message in enumerate(messages):
        problem = _message_problem(message, provider)
        if problem:
            return f"message {index}: {problem}"
        trained += message["role"] == "assistant" and message.get("weight", 1) != 0
    if not trained:
        return "no assistant message to train on: each example needs at least one"
    return None


def _message_problem(message: Any, provider: str) -> str | None:
    if not isinstance(message, dict):
        return f"a JSON {type(message).__name__}, not an object with 'role' and 'content'"
    role = message.get("role")
    if role not in CHAT_ROLES[provider]:
        return f"role {role!r} is not one of {', '.join(CHAT_ROLES[provider])}"
    unknown = sorted(set(message) - set(MESSAGE_FIELDS))
    if unknown:
        return f"unknown field {unknown[0]!r} (a message has {', '.join(MESSAGE_FIELDS)})"
    content = message.get("content")
    if role == "assistant" and content is None and message.get("tool_calls"):
        return None
    if not isinstance(content, str) or not content.strip():
        return f"{role} content is {json.dumps(content)[:40]}, not a non-empty string"
    if message.get("weight", 1) not in (0, 1):
        return f"weight is {message['weight']!r}; it is 0 or 1"
    return None


def estimate_tokens(row: Mapping[str, Any]) -> int:
    """The row's tokens, estimated as the module says (leaning high)."""
    if "messages" in row:
        texts = [str(m.get("content") or "") for m in row["messages"]]
        overhead = MESSAGE_OVERHEAD * len(texts)
    else:
        texts = [str(row.get(name, "")) for name in ("text", "prompt", "completion")]
        overhead = 0
    return math.ceil(sum(count_tokens(text) for text in texts) * TOKEN_MARGIN) + overhead


def price_per_million(provider: str, model: str, given: float | None) -> tuple[float | None, str]:
    """USD per million training tokens for `model`, and where the price came from; None when
    neither the spec nor the table knows it."""
    if given is not None:
        return float(given), "the spec's price_per_million_tokens"
    table = PRICES_USD_PER_MILLION.get(provider, {})
    matches = [prefix for prefix in table if model == prefix or model.startswith(prefix + "-")]
    if not matches:
        return None, "unknown"
    return table[max(matches, key=len)], f"the built-in table ({PRICES_AS_OF}) for {max(matches, key=len)}"


def epochs_for_estimate(n_epochs: int | str, n_rows: int) -> int:
    """The epochs a job will run: `n_epochs`, or for OpenAI's "auto" the rule its data
    preparation guide gives (3, raised toward 100 examples seen, lowered toward 25,000)."""
    if isinstance(n_epochs, int):
        return n_epochs
    if n_rows * 3 < 100:
        return min(25, math.ceil(100 / n_rows))
    if n_rows * 3 > 25_000:
        return max(1, 25_000 // n_rows)
    return 3
