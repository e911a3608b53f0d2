"""Errors a user can cause in a spec, reported as `file:line:column` with the offending lines."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from difflib import get_close_matches
from itertools import islice
from pathlib import Path


@dataclass(frozen=True)
class Mark:
    """A position in a source file; line and column are 1-based."""

    file: Path
    line: int
    column: int

    def __str__(self) -> str:
        return f"{_display(self.file)}:{self.line}:{self.column}"

    @property
    def short(self) -> str:
        """`file:line`, the form used for gates and stages in reports."""
        return f"{_display(self.file)}:{self.line}"


@dataclass(frozen=True)
class Problem:
    message: str
    mark: Mark | None = None
    where: str = ""  # the path inside the spec, e.g. "stages.train.params.lr"

    def render(self) -> str:
        head = f"{self.mark}: " if self.mark else ""
        where = f"{self.where}: " if self.where else ""
        text = f"{head}{where}{self.message}"
        if self.mark:
            text += "\n" + snippet(self.mark)
        return text


class SpecError(Exception):
    """One or more problems in a spec; str() is the full user-facing message."""

    def __init__(self, problems: list[Problem] | Problem):
        problems = [problems] if isinstance(problems, Problem) else problems
        # in source order, each once: checks of several profiles find the same mistake again
        self.problems = sorted(dict.fromkeys(problems), key=_source_order)
        super().__init__("\n\n".join(_render_grouped(self.problems)))

    @classmethod
    def at(cls, message: str, mark: Mark | None = None, where: str = "") -> SpecError:
        return cls(Problem(message, mark, where))


class UnknownProfile(SpecError):
    """The spec defines no profile of the name asked for (`--profile`)."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`; did you mean 'x'?` with the choice nearest to `word`, or "" when none is near."""
    hint = get_close_matches(word, list(choices), n=1)
    return f"; did you mean {hint[0]!r}?" if hint else ""


MAX_LISTED = 10_000  # entries of a directory read for near names: /proc or a data dump is not read whole


def near_names(missing: Path) -> str:
    """`; near names in DIR: ...`, what lies near `missing`, a path that does not exist: the
    names like its first missing part in the directory that would hold it (a typo in a
    directory is named there); "" where that directory cannot be read."""
    first = missing
    while not first.parent.exists() and first.parent != first:
        first = first.parent
    try:
        with os.scandir(first.parent) as entries:
            names = [entry.name for entry in islice(entries, MAX_LISTED)]
    except OSError:  # not a directory, or not readable: nothing to suggest
        return ""
    near = get_close_matches(first.name, names, n=3, cutoff=0.7)  # a shared extension alone is not near
    if near:
        found = f"near names in {first.parent}: {', '.join(near)}"
    else:
        found = f"nothing of a similar name in {first.parent}"
    return f"; {found}" if first == missing else f"; the directory {first} does not exist; {found}"


def _source_order(problem: Problem) -> tuple:
    mark = problem.mark
    return (str(mark.file), mark.line, mark.column) if mark else ("",)


def _render_grouped(problems: list[Problem]) -> list[str]:
    """One block per distinct message: a missing API key named by three stages is one
    problem to fix, so it is shown once with the other places listed."""
    groups: dict[str, list[Problem]] = {}
    for problem in problems:
        groups.setdefault(problem.message, []).append(problem)
    blocks = []
    for first, *same in groups.values():
        text = first.render()
        if same:
            places = ", ".join(f"{p.mark.short if p.mark else '?'} ({p.where})" for p in same)
            text += f"\n(the same at {places})"
        blocks.append(text)
    return blocks


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


_QUOTABLE: set[Path] = set()


def allow_quoting(file: Path) -> None:
    """Let error snippets show lines of `file`: the spec the user passed, and fragments of
    its project that parsed as YAML mappings. Any other file (`include: /proc/self/environ`)
    is named by position only, so an error never prints what an unrelated file holds."""
    _QUOTABLE.add(file.resolve())


def _lines(file: Path) -> tuple[str, ...]:
    try:
        return tuple(file.read_text(encoding="utf-8", errors="replace").splitlines())
    except OSError:
        return ()


def source_line(mark: Mark) -> str:
    lines = _lines(mark.file)
    return lines[mark.line - 1] if 0 < mark.line <= len(lines) else ""


def snippet(mark: Mark, context: int = 1) -> str:
    """The lines around `mark`, numbered, with a caret under the column."""
    lines = _lines(mark.file) if mark.file.resolve() in _QUOTABLE else ()
    if not lines or mark.line < 1:
        return ""
    first = max(1, mark.line - context)
    last = min(len(lines), mark.line + context)
    width = len(str(last))
    out = []
    for n in range(first, last + 1):
        pointer = ">" if n == mark.line else " "
        out.append(f"  {pointer} {n:>{width}} | {lines[n - 1]}")
        if n == mark.line:
            out.append(f"    {' ' * width} | {' ' * max(mark.column - 1, 0)}^")
    return "\n".join(out)
