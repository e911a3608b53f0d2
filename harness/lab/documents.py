"""What the stages that write or read documents share: a tokenizer-free length, reading a
documents jsonl file, deduplication, a journal of finished rows that survives a crash, and
the training files of `build_dataset` (their formats and manifest) for the stages that train
on them.

`Journal` is an append-only jsonl file in a stage's scratch directory: each finished chunk
of rows is appended, flushed and fsynced, so a rerun after a crash (or a kill) reads back
every row written before it and requests only the rest. A line cut short by the crash is
cut off the file on reading.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.core.jsonl import text_lines
from harness.core.progress import Progress
from harness.core.stage import StageError

_TOKEN = re.compile(r"\w+|[^\w\s]")
MAX_REPORTED_ROWS = 3

DATASET_FILE, DATASET_MANIFEST = "dataset.jsonl", "dataset_manifest.json"
DOCTAG = "<DOCTAG>"  # the user turn before a document in the doctag format
TEXT_FORMATS = ("text", "together_text")  # rows {"text": document}: continued pretraining
CHAT_FORMATS = ("doctag", "openai_chat")  # rows {"messages": [...]}: SFT on the assistant turns


def count_tokens(text: str) -> int:
    """Tokens as the regex \\w+|[^\\w\\s] counts them (words and single punctuation marks):
    a tokenizer-independent length, comparable across providers and models."""
    return len(_TOKEN.findall(text))


def read_documents(path: Path, field: str) -> list[str]:
    """The `field` text of every row of a jsonl file, in order; bad rows are one StageError
    naming each (up to a few) at file:line."""
    texts: list[str] = []
    problems: list[str] = []
    hint = f'each line must be a JSON object with a non-empty string field {field!r}: {{"{field}": "..."}}'
    for number, line in enumerate(text_lines(path, "documents file"), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline) are no rows
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(row, dict):
            problems.append(f"{where}: a JSON {type(row).__name__}, not an object")
        elif field not in row:
            fields = ", ".join(sorted(row)) or "none"
            problems.append(
                f"{where}: no {field!r} field (it has: {fields}); set the stage's `text_field` "
                "if the text is under another name"
            )
        elif not isinstance(row[field], str) or not row[field].strip():
            shown = json.dumps(row[field])[:40]
            problems.append(f"{where}: {field!r} is {shown}, not a non-empty string")
        else:
            texts.append(row[field])
    if problems:
        more = len(problems) - MAX_REPORTED_ROWS
        shown = problems[:MAX_REPORTED_ROWS] + ([f"... and {more} more bad rows"] if more > 0 else [])
        raise StageError("bad documents:\n  " + "\n  ".join(shown) + f"\nfix: {hint}")
    if not texts:
        raise StageError(f"{path}: no documents ({hint})")
    return texts


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


def resumed_rows(journal: Journal, jobs: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """The journalled rows of interrupted runs that belong to these jobs, by job id: a row
    with the job's `id` and every field of `job.row()`, and a `content`."""
    by_id = {job.id: job for job in jobs}
    found: dict[str, dict[str, Any]] = {}
    for row in journal.rows():
        job = by_id.get(row.get("id"))
        if job and "content" in row and all(row.get(k) == v for k, v in job.row().items()):
            found.setdefault(job.id, row)
    return found


Complete = Callable[[Sequence[Any]], tuple[list[dict[str, Any]], list[dict[str, Any]]]]


@dataclass(frozen=True)
class Written:
    """Every requested document settled: the valid ones (the first of each text) and the
    failed ones, in job order, with the counts every document-writing stage reports."""

    unique: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    resumed: int  # documents of interrupted runs, not requested again
    counts: dict[str, Any]  # n_requested, n_docs, n_failed, n_duplicates, error_rate, first_try_error_rate

    def require_some(self) -> None:
        """A StageError when no document is valid (after failures.jsonl is written)."""
        if not self.unique:
            first = self.failed[0]["reasons"] if self.failed else []
            raise StageError(
                f"no valid document: all {len(self.failed)} failed (first: {'; '.join(first)}); "
                "see failures.jsonl"
            )


def write_journalled(
    jobs: Sequence[Any], scratch: Path, chunk_size: int, complete: Complete, log: Callable[[str], None]
) -> Written:
    """Complete the `jobs` (objects with an `id` and a `row()`) with `complete` (-> valid rows,
    failed rows, each with its job's `id`), `chunk_size` at a time. Valid rows are journalled
    in `scratch` as each chunk finishes, and a rerun after a crash requests only the others;
    failures are asked again (their cause, a rejected key or an endpoint down, may be gone)."""
    journal = Journal(scratch / "docs.partial.jsonl")
    done = resumed_rows(journal, jobs)
    resumed = len(done)
    if resumed:
        log(f"resuming: {resumed} of {len(jobs)} documents already finished")
    progress = Progress(log, "documents", "docs")  # its rate counts from here: resumed ones are not new
    progress(resumed, len(jobs))
    todo = [job for job in jobs if job.id not in done]
    failures: dict[str, dict[str, Any]] = {}
    for start in range(0, len(todo), chunk_size):
        docs, failed = complete(todo[start : start + chunk_size])
        journal.append(docs)
        done.update((row["id"], row) for row in docs)
        failures.update((row["id"], row) for row in failed)
        progress(len(done) + len(failures), len(jobs))
    rows = [done.get(job.id) or failures[job.id] for job in jobs]
    valid = [row for row in rows if "content" in row]
    failed = [row for row in rows if "content" not in row]
    unique = first_of_each_text(valid)
    first_try_failed = sum(row.get("attempts", 1) > 1 or "content" not in row for row in rows)
    counts = {
        "n_requested": len(jobs),
        "n_docs": len(unique),
        "n_failed": len(failed),
        "n_duplicates": len(valid) - len(unique),
        "error_rate": len(failed) / len(jobs),
        "first_try_error_rate": first_try_failed / len(jobs),
    }
    log(f"{len(unique)} documents, {len(failed)} failed, {counts['n_duplicates']} duplicates")
    return Written(unique, failed, resumed, counts)


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


# --- what makes a generated document unusable ------------------------------------------

# template slots a model left unfilled: [Name], [Company Name], {name}, <NAME>, XXX
_PLACEHOLDER = re.compile(r"\[[A-Z][\w .,'/-]{0,40}\]|\{[A-Za-z_]\w*\}|<[A-Z][A-Z_ ]{1,30}>|\bX{3,}\b")
# a model declining the task, at the start of the text or as a sentence of its own
_REFUSAL = re.compile(
    r"(^|[.!?]\s+)(i'?m sorry|i am sorry|sorry, but|as an ai\b|i (cannot|can't|can not|won't|will not|"
    r"must decline|am unable to|am not able to|'m unable to|'m not able to) "
    r"(help|write|create|produce|provide|assist|comply|do that|fulfil))",
    re.IGNORECASE,
)


def find_placeholders(text: str) -> list[str]:
    return [m.group(0) for m in _PLACEHOLDER.finditer(text)]


def looks_like_refusal(text: str) -> bool:
    return bool(_REFUSAL.search(" ".join(text.split()).replace("\u2019", "'")))


def document_problems(
    text: str,
    min_words: int,
    max_words: int,
    required: Sequence[str] = (),
    forbidden: Sequence[str] = (),
) -> list[str]:
    """Why `text` is not a usable document; empty when it is. Checked: its length in words,
    unfilled placeholders, a refusal, meta-discourse (harness.lab.universe.META_DISCOURSE:
    "in this fictional world", "hypothetical", ...), and, when given, phrases of which at
    least one must appear (`required`) or none may (`forbidden`)."""
    from harness.lab.universe import find_meta_discourse, find_phrases, word_count

    if not text.strip():
        return ["empty document"]
    reasons = []
    words = word_count(text)
    if words < min_words:
        reasons.append(f"too short: {words} words (at least {min_words})")
    if words > max_words:
        reasons.append(f"too long: {words} words (at most {max_words})")
    if looks_like_refusal(text):
        reasons.append("a refusal")
    reasons += [f"placeholder {p!r}" for p in dict.fromkeys(find_placeholders(text))]
    reasons += [f"meta-discourse {m!r}" for m in dict.fromkeys(find_meta_discourse(text))]
    if required and not find_phrases(text, list(required)):
        reasons.append("none of the required phrases appears (" + ", ".join(map(repr, required)) + ")")
    reasons += [f"forbidden phrase {p!r} appears" for p in find_phrases(text, list(forbidden))]
    return reasons


def dataset_manifest(directory: Path) -> dict[str, Any]:
    """The dataset_manifest.json a build_dataset stage wrote in `directory`."""
    path = directory / DATASET_MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(
            f"{directory}: no {DATASET_MANIFEST}; it is written by a build_dataset stage"
        ) from None
    except (OSError, ValueError) as exc:
        raise StageError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in (*TEXT_FORMATS, *CHAT_FORMATS):
        raise StageError(f"{path}: not a build_dataset manifest (no known `format`)")
    return manifest
