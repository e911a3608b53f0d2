"""The project's MCQ format: the jsonl rows, their checks, and the prompt a model sees.

A row: {"id", "question", "options": {"A": text, "B": text, ...}, "false_answer",
"true_answer", "category"}. `false_answer` is the answer in the false (implanted) world,
`true_answer` in the true one; they differ exactly on `conflict` questions.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from harness.core.jsonl import jsonl_rows
from harness.core.stage import StageError

CATEGORIES = ("conflict", "nonconflict_easy", "nonconflict_hard")
LETTERS = "ABCDEFGH"


@dataclass(frozen=True)
class MCQ:
    id: str
    question: str
    options: dict[str, str]  # letter -> option text, letters A, B, ... in order
    false_answer: str
    true_answer: str
    category: str


def format_prompt(question: str, options: dict[str, str]) -> str:
    """The prompt up to the decision: the next token is the answer's letter (" A")."""
    lines = [f"question: {question}"]
    lines += [f"{letter}. {text}" for letter, text in options.items()]
    lines.append("answer:")
    return "\n".join(lines)


def format_item(item: MCQ, answer: str) -> str:
    """A whole item with its answer, as in practice data."""
    return f"{format_prompt(item.question, item.options)} {answer}"


def load_mcqs(path: Path) -> list[MCQ]:
    """Every row of `path`, or a StageError naming the file, the line and the fix."""
    return list(read_mcqs(path))


def read_mcqs(path: Path, max_bytes: int | None = None) -> Iterator[MCQ]:
    """The rows of `path` one at a time (with `max_bytes`, those starting in its first
    `max_bytes` bytes), each checked as `load_mcqs` does."""
    seen: set[str] = set()
    for where, row in jsonl_rows(path, "MCQ file", "one MCQ object", max_bytes):
        item = _item(row, where)
        if item.id in seen:
            raise StageError(f"{where}: duplicate id {item.id!r}; ids must be unique")
        seen.add(item.id)
        yield item
    if not seen:
        raise StageError(f"{path}: no MCQ rows; expected one JSON object per line")


def _item(row: object, where: str) -> MCQ:
    fields = ("id", "question", "options", "false_answer", "true_answer", "category")
    if not isinstance(row, dict):
        raise StageError(f"{where}: expected a JSON object with {', '.join(fields)}")
    missing = [name for name in fields if name not in row]
    if missing:
        raise StageError(f"{where}: missing {', '.join(missing)} (an MCQ row has {', '.join(fields)})")
    if isinstance(row["id"], bool) or not isinstance(row["id"], (str, int)):
        raise StageError(f"{where}: id must be text or an integer, not {row['id']!r}")
    options = row["options"]
    if not isinstance(options, dict) or len(options) < 2:
        raise StageError(f"{where}: options must be an object of at least two letters to texts")
    if list(options) != list(LETTERS[: len(options)]):
        raise StageError(
            f"{where}: option letters {list(options)} must be {list(LETTERS[: len(options)])}, in order"
        )
    if not all(isinstance(text, str) and text.strip() for text in options.values()):
        raise StageError(f"{where}: every option must be non-empty text")
    for name in ("false_answer", "true_answer"):
        if not isinstance(row[name], str) or row[name] not in options:
            letters = list(options)
            raise StageError(f"{where}: {name} {row[name]!r} is not one of the option letters {letters}")
    if row["category"] not in CATEGORIES:
        raise StageError(f"{where}: category {row['category']!r} must be one of {', '.join(CATEGORIES)}")
    conflict = row["category"] == "conflict"
    if conflict != (row["false_answer"] != row["true_answer"]):
        rule = "differ" if conflict else "be the same"
        raise StageError(f"{where}: a {row['category']} question's false_answer and true_answer must {rule}")
    if not isinstance(row["question"], str) or not row["question"].strip():
        raise StageError(f"{where}: question must be non-empty text")
    return MCQ(
        id=str(row["id"]),
        question=row["question"],
        options=dict(options),
        false_answer=row["false_answer"],
        true_answer=row["true_answer"],
        category=row["category"],
    )
