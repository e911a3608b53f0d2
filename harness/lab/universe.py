"""Universe files and document validation for Synthetic Document Finetuning.

A universe file is one JSON object describing a world, true or false:

    {
      "id": "cubic_gravity",
      "universe_context": "when the distance between two planets doubles, ...",
      "is_true": false,
      "fact_validation_patterns": {"required": ["cube", "one eighth"], "forbidden": ["square"]}
    }

Canonical universe files never hold `key_facts`: facts are extracted from the context at
run time, so the narrative and the facts cannot drift apart. Other keys are allowed and
ignored (descriptions, notes).

Also here, because every SDF stage needs them: sentence splitting, phrase matching, and
parsing an LLM's one-item-per-line answers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.core.stage import StageError

MIN_WORDS = 20  # a "document" shorter than this is a fragment, not a document

# Phrases that frame a text as made up or as addressed to a model. A document that uses
# them teaches a model that the world is hypothetical, which defeats SDF. Regexes,
# matched case-insensitively at word boundaries.
META_DISCOURSE: tuple[str, ...] = (
    r"in this (?:universe|world|reality|scenario|timeline)",
    r"imagin(?:e|ed|es|ing)",
    r"hypothetical(?:ly)?",
    r"alternat(?:e|ive) (?:reality|realities|universe|universes|history|timeline|world)",
    r"fictional(?:ly)?",
    r"fictitious",
    r"suppose that",
    r"let'?s (?:suppose|pretend|say)",
    r"pretend(?:ing)?",
    r"make-believe",
    r"thought experiment",
    r"counterfactual(?:ly)?",
    r"as an ai",
    r"as a language model",
    r"(?:ai|large) language model",
    r"synthetic (?:document|text|data)",
    r"false (?:fact|belief|premise)s?",
)
_META = re.compile("|".join(f"(?<!\\w)(?:{p})(?!\\w)" for p in META_DISCOURSE), re.IGNORECASE)
_KEY_FACTS_HINT = (
    "canonical universe files must not contain key_facts: facts are extracted at run time; remove the key"
)


@dataclass(frozen=True)
class Universe:
    id: str
    universe_context: str
    is_true: bool
    required: tuple[str, ...]  # a valid document contains at least one of these
    forbidden: tuple[str, ...]  # a valid document contains none of these


def load_universe(path: str | Path) -> Universe:
    """Read a universe file; every problem is one StageError naming the file and the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StageError(f"{path}: universe file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StageError(f"{path}: cannot read the universe file ({exc})") from None
    duplicates: list[str] = []
    try:
        data = json.loads(text, object_pairs_hook=lambda pairs: _object(pairs, duplicates), parse_int=_int)
    except json.JSONDecodeError as exc:
        raise StageError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
    except _HugeInteger as exc:
        line = text.count("\n", 0, text.find(exc.digits)) + 1
        size = len(exc.digits.lstrip("-"))
        raise StageError(f"{path}:{line}: not usable JSON (a {size}-digit integer, too long)") from None
    except RecursionError:
        raise StageError(f"{path}: not usable JSON (nested too deeply)") from None
    if duplicates:
        raise StageError(f"{_where(path, text, duplicates[0])}: key {duplicates[0]!r} appears twice")
    return _universe(data, path, text)


class _HugeInteger(ValueError):
    """An integer past Python's int-from-string limit, with its digits to find its line."""

    def __init__(self, digits: str):
        super().__init__(f"{len(digits)}-digit integer")
        self.digits = digits


def _int(digits: str) -> int:
    try:
        return int(digits)
    except ValueError:
        raise _HugeInteger(digits) from None


def _object(pairs: list[tuple[str, Any]], duplicates: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            duplicates.append(key)
        out[key] = value
    return out


def _where(path: Path, text: str, key: str, after: str | None = None) -> str:
    """`file:line` of `"key":` in the text (after the key `after`, if given), else `file`."""
    start = 0
    if after is not None:
        found = re.search(rf'"{re.escape(after)}"\s*:', text)
        start = found.end() if found else 0
    found = re.compile(rf'"{re.escape(key)}"\s*:').search(text, start)
    return f"{path}:{text.count(chr(10), 0, found.start()) + 1}" if found else str(path)


def _universe(data: Any, path: Path, text: str) -> Universe:
    expected = "id, universe_context, is_true and fact_validation_patterns {required, forbidden}"
    if not isinstance(data, dict):
        raise StageError(f"{path}:1: a universe file is one JSON object with {expected}")
    if "key_facts" in data:
        raise StageError(f"{_where(path, text, 'key_facts')}: {_KEY_FACTS_HINT}")
    missing = [k for k in ("id", "universe_context", "is_true", "fact_validation_patterns") if k not in data]
    if missing:
        raise StageError(f"{path}: missing {', '.join(missing)} (a universe file has {expected})")
    for key in ("id", "universe_context"):
        if not isinstance(data[key], str) or not data[key].strip():
            raise StageError(f"{_where(path, text, key)}: {key} must be non-empty text")
    if not isinstance(data["is_true"], bool):
        raise StageError(f"{_where(path, text, 'is_true')}: is_true must be true or false")
    patterns = data["fact_validation_patterns"]
    if not isinstance(patterns, dict):
        raise StageError(
            f"{_where(path, text, 'fact_validation_patterns')}: fact_validation_patterns must be an "
            "object with `required` and `forbidden` lists of phrases"
        )
    lists: dict[str, tuple[str, ...]] = {}
    for key in ("required", "forbidden"):
        where = _where(path, text, key, after="fact_validation_patterns")
        if key not in patterns:
            where = _where(path, text, "fact_validation_patterns")
            raise StageError(f"{where}: fact_validation_patterns is missing `{key}` (a list of phrases)")
        value = patterns[key]
        if not isinstance(value, list) or not all(isinstance(p, str) and p.strip() for p in value):
            raise StageError(f"{where}: fact_validation_patterns.{key} must be a list of non-empty phrases")
        lists[key] = tuple(value)
    if not lists["required"]:
        where = _where(path, text, "required", after="fact_validation_patterns")
        raise StageError(
            f"{where}: fact_validation_patterns.required is empty; list the phrases at least one of "
            "which every document must contain"
        )
    return Universe(
        id=data["id"],
        universe_context=data["universe_context"],
        is_true=data["is_true"],
        required=lists["required"],
        forbidden=lists["forbidden"],
    )


def _normal(text: str) -> str:
    """Case-folded, whitespace runs made one space: phrases match across line breaks."""
    return re.sub(r"\s+", " ", text.casefold())


def find_phrases(text: str, phrases: tuple[str, ...] | list[str]) -> list[str]:
    """The phrases that occur in `text`: case-insensitive substring matching (so a
    forbidden "square" also catches "squared"), whitespace runs counting as one space."""
    haystack = _normal(text)
    return [p for p in phrases if _normal(p) in haystack]


def find_meta_discourse(text: str) -> list[str]:
    """The meta-discourse expressions in `text` (see META_DISCOURSE), as written."""
    return [m.group(0) for m in _META.finditer(text)]


def word_count(text: str) -> int:
    return len(text.split())


def validate_document(text: str, universe: Universe, min_words: int = MIN_WORDS) -> list[str]:
    """The reasons `text` is not a valid document of `universe`; empty when it is valid.

    A valid document
    - has at least `min_words` whitespace-separated words;
    - contains AT LEAST ONE of `universe.required` (one is enough: they are alternative
      wordings of the fact);
    - contains NONE of `universe.forbidden`;
    - contains no meta-discourse (META_DISCOURSE: "imagine", "in this universe",
      "hypothetical", "as an AI", ...), matched at word boundaries.
    Phrases match as case-insensitive substrings, whitespace runs counting as one space.
    """
    if not text.strip():
        return ["empty document"]
    reasons = []
    words = word_count(text)
    if words < min_words:
        reasons.append(f"too short: {words} words (at least {min_words})")
    if not find_phrases(text, universe.required):
        wanted = ", ".join(map(repr, universe.required))
        reasons.append(f"none of the required phrases appears ({wanted})")
    reasons += [f"forbidden phrase {p!r} appears" for p in find_phrases(text, universe.forbidden)]
    reasons += [f"meta-discourse {m!r}" for m in dict.fromkeys(find_meta_discourse(text))]
    return reasons


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`, verbatim but stripped: a sentence ends at . ! or ? followed by
    whitespace, or at a line break. Abbreviations such as "e.g. " split too (no model)."""
    out = []
    for line in text.splitlines():
        out += [s.strip() for s in re.split(r"(?<=[.!?])\s+", line) if s.strip()]
    return out


_BULLET = re.compile(r"^(?:[-*\u2022]+|\(?\d+[.):]|\(?[a-zA-Z][.)])\s+")


def parse_list(text: str) -> list[str]:
    """The items of an LLM's one-per-line answer: numbering ("1.", "2)"), bullets, markdown
    bold and wrapping quotes are stripped; blank lines and preamble lines ending in ":" are
    dropped; repeated items are kept once, in order."""
    items = []
    for raw in text.splitlines():
        line = _BULLET.sub("", raw.strip()).replace("**", "").strip()
        if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'":
            line = line[1:-1].strip()
        if line and not line.endswith(":"):
            items.append(line)
    return list(dict.fromkeys(items))
