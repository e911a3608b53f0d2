"""Reading the project's text data files: whole text, and jsonl rows with their line.

Every loader of a data file (MCQs, statements, chat conversations, questions,
constitutions) reports a problem as `file:line: what is wrong; what to do`; these two
functions do the reading part once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.stage import StageError


def read_text(path: Path, what: str) -> str:
    """The file's UTF-8 text (a leading BOM dropped), or a StageError saying why not."""
    try:
        return Path(path).read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise StageError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise StageError(f"{path}: is a directory; expected a {what}") from None
    except UnicodeDecodeError as exc:
        where = f"{exc.reason} at byte {exc.start}"
        raise StageError(f"{path}: not UTF-8 text ({where}); save it as UTF-8") from None
    except OSError as exc:
        raise StageError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None


def jsonl_rows(path: Path, what: str, expected: str) -> Iterator[tuple[str, Any]]:
    """(`file:line`, parsed row) for every non-blank line of a jsonl file; a line that is
    not JSON is a StageError at its line saying each line is `expected`."""
    for line_no, line in enumerate(read_text(path, what).split("\n"), 1):
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
