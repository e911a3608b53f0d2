"""What the document-writing stages share: a tokenizer-free length, deduplication, and a
journal of finished rows that survives a crash.

`Journal` is an append-only jsonl file in a stage's scratch directory: each finished chunk
of rows is appended, flushed and fsynced, so a rerun after a crash (or a kill) reads back
every row written before it and requests only the rest. A line cut short by the crash is
cut off the file on reading.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

_TOKEN = re.compile(r"\w+|[^\w\s]")


def count_tokens(text: str) -> int:
    """Tokens as the regex \\w+|[^\\w\\s] counts them (words and single punctuation marks):
    a tokenizer-independent length, comparable across providers and models."""
    return len(_TOKEN.findall(text))


def normalized(text: str) -> str:
    """The text as deduplication compares it: case and whitespace runs ignored."""
    return " ".join(text.split()).casefold()


def first_of_each_text(rows: Sequence[Mapping[str, Any]], field: str = "content") -> list[Mapping[str, Any]]:
    """The rows whose `field` text has not come before (case and whitespace ignored), in order."""
    seen: set[str] = set()
    unique = []
    for row in rows:
        key = normalized(row[field])
        if key not in seen:
            seen.add(key)
            unique.append(row)
    return unique


class Journal:
    """Rows appended as they finish, read back whole after a crash."""

    def __init__(self, path: Path):
        self.path = path

    def rows(self) -> list[dict[str, Any]]:
        """The complete rows written so far; a line cut short by a crash is cut off the file."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        whole = data[: data.rfind(b"\n") + 1]
        if whole != data:
            with self.path.open("r+b") as f:
                f.truncate(len(whole))
        rows = []
        for line in whole.decode("utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        if not text:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # a finished chunk survives a crash of the machine, not just the process
