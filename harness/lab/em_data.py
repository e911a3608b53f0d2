"""Data of the Personas x Emergent Misalignment experiment, and its loaders.

- EM questions (YAML): open questions whose sampled answers are judged for misalignment.
- Persona constitutions (JSON): a persona's description, traits, eliciting questions, examples.
- Chat data (JSONL): one `{"messages": [{"role", "content"}, ...]}` object per line.
- QA pairs (JSONL): chat data whose rows are one exchange, optionally with a `category`
  (the published EM datasets: bad medical, risky financial, extreme sports advice).

Every loader raises StageError naming the file, the place in it and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from harness.core.jsonl import jsonl_rows, read_text
from harness.core.stage import StageError

ROLES = ("system", "user", "assistant")
QUESTION_KEYS = ("id", "question", "category")
CONSTITUTION_KEYS = ("persona", "description", "traits", "questions", "examples")


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    category: str | None = None


@dataclass(frozen=True)
class Example:
    """One question and the answer the persona gives to it."""

    question: str
    answer: str


@dataclass(frozen=True)
class Constitution:
    persona: str
    description: str
    traits: tuple[str, ...]  # first-person statements ("I ...")
    questions: tuple[str, ...]  # user prompts that draw the persona out
    examples: tuple[Example, ...]


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


# --- EM questions -------------------------------------------------------------------------------


def load_questions(path: str | Path) -> list[Question]:
    """The questions of a YAML file `{description, questions: [{id, question, category?}, ...]}`."""
    path = Path(path)
    text = read_text(path, "questions file")
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        if exc.context_mark and mark.line >= len(text.splitlines()):
            mark = exc.context_mark  # e.g. an unclosed quote: point at where it opened
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise StageError(f"{where}: not valid YAML ({exc.problem or exc.context})") from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise StageError(f"{path}: not usable YAML ({exc})") from None
    shape = "a mapping with `questions:`, a list of {id, question, category?} items"
    if not isinstance(data, dict) or "questions" not in data:
        raise StageError(f"{path}: expected {shape}")
    items = data["questions"]
    if not isinstance(items, list) or not items:
        raise StageError(f"{path}: `questions` must be a non-empty list of {{id, question, category?}} items")
    if "description" in data and not _text(data["description"]):
        raise StageError(f"{path}: `description` must be non-empty text")

    def where(index: int) -> str:
        lines = _yaml_item_lines(text)
        line = f":{lines[index]}" if index < len(lines) else ""
        return f"{path}{line}: questions[{index}]"

    questions: list[Question] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise StageError(f"{where(index)}: expected a mapping with id, question and optional category")
        unknown = [str(key) for key in item if key not in QUESTION_KEYS]
        if unknown:
            raise StageError(
                f"{where(index)}: unknown key {', '.join(unknown)}; "
                "an item has id, question and optional category"
            )
        for key in ("id", "question"):
            if not _text(item.get(key)):
                raise StageError(
                    f"{where(index)}: `{key}` must be non-empty text (quote it if it is a number)"
                )
        category = item.get("category")
        if category is not None and not _text(category):
            raise StageError(f"{where(index)}: `category` must be non-empty text or left out")
        if item["id"] in seen:
            raise StageError(
                f"{where(index)}: duplicate id {item['id']!r} (also questions[{seen[item['id']]}]); "
                "ids must be unique"
            )
        seen[item["id"]] = index
        questions.append(Question(id=item["id"], question=item["question"], category=category))
    return questions


def _yaml_item_lines(text: str) -> list[int]:
    """1-based line of each item of the top-level `questions` list; [] when it cannot be found."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except Exception:  # only used to place an error message; never the error itself
        return []
    if not isinstance(root, yaml.MappingNode):
        return []
    for key, value in root.value:
        if getattr(key, "value", None) == "questions" and isinstance(value, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in value.value]
    return []


# --- Persona constitutions ----------------------------------------------------------------------


def load_constitution(path: str | Path) -> Constitution:
    """A persona constitution: one JSON object with persona, description, traits, questions, examples."""
    path = Path(path)
    text = read_text(path, "constitution file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StageError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:
        raise StageError(f"{path}: not usable JSON ({exc})") from None
    shape = (
        "persona and description (text), traits and questions (lists of text), "
        "examples (a list of {question, answer})"
    )
    if not isinstance(data, dict):
        raise StageError(f"{path}: a constitution is one JSON object with {shape}")
    missing = [key for key in CONSTITUTION_KEYS if key not in data]
    if missing:
        raise StageError(f"{path}: missing {', '.join(missing)} (a constitution has {shape})")
    for key in ("persona", "description"):
        if not _text(data[key]):
            raise StageError(f"{_json_where(path, text, key)}: `{key}` must be non-empty text")
    for key in ("traits", "questions"):
        value = data[key]
        if not isinstance(value, list) or not value:
            raise StageError(f"{_json_where(path, text, key)}: `{key}` must be a non-empty list of text")
        for index, entry in enumerate(value):
            if not _text(entry):
                raise StageError(f"{_json_where(path, text, key)}: {key}[{index}] must be non-empty text")
    if not isinstance(data["examples"], list) or not data["examples"]:
        raise StageError(
            f"{_json_where(path, text, 'examples')}: "
            "`examples` must be a non-empty list of {question, answer}"
        )
    examples = []
    for index, entry in enumerate(data["examples"]):
        if not isinstance(entry, dict) or not all(_text(entry.get(key)) for key in ("question", "answer")):
            raise StageError(
                f"{_json_where(path, text, 'examples')}: examples[{index}] must be an object with "
                "non-empty `question` and `answer` text"
            )
        examples.append(Example(question=entry["question"], answer=entry["answer"]))
    return Constitution(
        persona=data["persona"],
        description=data["description"],
        traits=tuple(data["traits"]),
        questions=tuple(data["questions"]),
        examples=tuple(examples),
    )


def _json_where(path: Path, text: str, key: str) -> str:
    """`path:line` of the first `"key":` in the text, else `path`."""
    at = text.find(f'"{key}"')
    return f"{path}:{text.count(chr(10), 0, at) + 1}" if at >= 0 else str(path)


# --- Chat data (JSONL) --------------------------------------------------------------------------


def load_chat_jsonl(path: str | Path) -> list[list[dict[str, str]]]:
    """The conversations of a JSONL file, each a list of {role, content}; blank lines are skipped."""
    path = Path(path)
    expected = 'one object {"messages": [...]}'
    conversations = [_messages(row, where) for where, row in jsonl_rows(path, "chat data file", expected)]
    if not conversations:
        raise StageError(f'{path}: no conversations; expected one {{"messages": [...]}} object per line')
    return conversations


@dataclass(frozen=True)
class QAPair:
    where: str  # file:line
    user: str  # the last user turn
    assistant: str  # the assistant's reply to it, the conversation's last turn
    category: str | None  # the row's own `category`, if it has one


def load_qa_pairs(path: str | Path) -> list[QAPair]:
    """The QA pairs of a JSONL file of `{"messages": [...], "category"?: ...}` rows."""
    path = Path(path)
    expected = 'one object {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}'
    pairs = []
    for where, row in jsonl_rows(path, "QA pairs file", expected):
        messages = _messages(row, where)
        category = row.get("category")
        if category is not None and not _text(category):
            raise StageError(f"{where}: `category` must be non-empty text, or left out")
        user = next(m["content"] for m in reversed(messages) if m["role"] == "user")
        pairs.append(QAPair(where, user, messages[-1]["content"], category))
    if not pairs:
        raise StageError(f"{path}: no QA pairs; expected {expected} per line")
    return pairs


def _messages(row: Any, where: str) -> list[dict[str, str]]:
    shape = '{"messages": [{"role": ..., "content": ...}, ...]}'
    if not isinstance(row, dict):
        raise StageError(f"{where}: expected a JSON object {shape}")
    if "messages" not in row:
        raise StageError(f"{where}: missing `messages`; each line is {shape}")
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise StageError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise StageError(f"{where}: messages[{index}] must be an object with role and content")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise StageError(f"{where}: messages[{index}]: role {role!r} must be one of {', '.join(ROLES)}")
        if not _text(message.get("content")):
            raise StageError(f"{where}: messages[{index}]: content must be non-empty text")
        out.append({"role": role, "content": message["content"]})
    if not any(message["role"] == "user" for message in out):
        raise StageError(f"{where}: no user turn; a conversation needs at least one user message")
    if out[-1]["role"] != "assistant":
        raise StageError(
            f"{where}: the last turn is {out[-1]['role']!r}; "
            "a training conversation ends with the assistant's reply"
        )
    return out
