"""Reading the project's text data files: whole text, lines, and jsonl rows with their line.

Every loader of a data file (MCQs, statements, chat conversations, questions,
constitutions) reports a problem as `file:line: what is wrong; what to do`; these two
functions do the reading part once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from harness.core.stage import StageError


def read_text(path: Path, what: str) -> str:
    """The file's UTF-8 text (a leading BOM dropped), or a StageError saying why not."""
    try:
        with _open(path, what) as file:
            return file.read().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        where = f"{exc.reason} at byte {exc.start}"
        raise StageError(f"{path}: not UTF-8 text ({where}); save it as UTF-8") from None
    except OSError as exc:  # a read that fails after the open
        raise StageError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None


def jsonl_rows(
    path: Path, what: str, expected: str, max_bytes: int | None = None
) -> Iterator[tuple[str, Any]]:
    """(`file:line`, parsed row) for every non-blank line of a jsonl file, read line by line
    (memory follows the longest line, not the file); with `max_bytes`, only the lines that
    start within the first `max_bytes` bytes. A line that is not JSON is a StageError at its
    line saying each line is `expected`."""
    for line_no, line in enumerate(text_lines(path, what, max_bytes), 1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            detail = f"{exc.msg} at column {exc.colno}"
            raise StageError(f"{where}: not valid JSON ({detail}); each line is {expected}") from None
        except (ValueError, RecursionError) as exc:  # e.g. huge integers, deep nesting
            raise StageError(f"{where}: not usable JSON ({exc}); each line is {expected}") from None
        yield where, row


def text_lines(path: Path, what: str, max_bytes: int | None = None) -> Iterator[str]:
    """The file's lines as UTF-8 text (a leading BOM dropped), each read when asked for."""
    with _open(path, what) as file:
        offset = 0
        for line_no, raw in enumerate(file, 1):
            if max_bytes is not None and offset >= max_bytes:
                return
            try:
                yield raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                where = f"{exc.reason} at byte {offset + exc.start}"
                raise StageError(f"{path}:{line_no}: not UTF-8 text ({where}); save it as UTF-8") from None
            offset += len(raw)


def _open(path: Path, what: str) -> BinaryIO:
    try:
        return Path(path).open("rb")
    except FileNotFoundError:
        raise StageError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise StageError(f"{path}: is a directory; expected a {what}") from None
    except OSError as exc:
        raise StageError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
