"""Errors a user can cause in a spec, reported as `file:line:column` with the offending lines."""

from __future__ import annotations

from dataclasses import dataclass
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
        self.problems = [problems] if isinstance(problems, Problem) else list(problems)
        super().__init__("\n\n".join(_render_grouped(self.problems)))

    @classmethod
    def at(cls, message: str, mark: Mark | None = None, where: str = "") -> SpecError:
        return cls(Problem(message, mark, where))


class UnknownProfile(SpecError):
    """The spec defines no profile of the name asked for (`--profile`)."""


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
