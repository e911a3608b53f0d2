"""What a run needs of this machine and lacks (API keys, base models not downloaded), found
while the kinds' collection checks run and reported for every collected experiment at once,
so that one round of fixes is enough.

A check that finds such a lack calls `lacking`: while the plugin loads experiments
(`gathering`) the lack is recorded in its stage and the check goes on; elsewhere (a spec
loaded by other code) `lacking` returns False and the check raises its own error."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace

from harness.spec.errors import Mark

TINY_HINT = "Or run the same pipeline on CPU, with no key and no download, with `--profile tiny`."


@dataclass(frozen=True)
class Missing:
    """One thing this machine lacks: `what` says what and how to get it; `path` is where the
    stage's params name it; `mark` is that line in the spec, once the stage has located it."""

    what: str
    path: tuple[str | int, ...]
    mark: Mark | None = None


_gathered: ContextVar[list[Missing] | None] = ContextVar("harness_preflight", default=None)


@contextmanager
def gathering() -> Iterator[None]:
    """While loading experiments for a run (the plugin's collection): the lacks that checks
    find are recorded in each stage (`StageSpec.missing`), not raised at the first one."""
    token = _gathered.set([])
    try:
        yield
    finally:
        _gathered.reset(token)


@contextmanager
def recorded() -> Iterator[list[Missing]]:
    """The lacks that the checks run inside record; none outside `gathering`, where they raise."""
    found: list[Missing] = []
    token = _gathered.set(found) if _gathered.get() is not None else None
    try:
        yield found
    finally:
        if token is not None:
            _gathered.reset(token)


def lacking(what: str, path: tuple[str | int, ...]) -> bool:
    """Record a lack when gathering (True: the check goes on), else False (it raises)."""
    found = _gathered.get()
    if found is None:
        return False
    found.append(Missing(what, tuple(path)))
    return True


def located(found: Iterable[Missing], mark_of) -> tuple[Missing, ...]:
    """`found` with each lack's line: `mark_of(path)` is the mark of a params path."""
    return tuple(replace(m, mark=mark_of(m.path)) for m in found)


def report(found: Iterable[Missing]) -> str | None:
    """One message listing every lack, each with the spec lines that need it; None when none."""
    places: dict[str, dict[str, list[str]]] = {}  # what -> spec file -> lines
    for m in found:
        file, line = str(m.mark).rsplit(":", 2)[:2] if m.mark else ("?", "?")
        lines = places.setdefault(m.what, {}).setdefault(file, [])
        if line not in lines:
            lines.append(line)
    if not places:
        return None
    lines = [f"this machine lacks {len(places)} thing{'s' * (len(places) > 1)} the collected stages need:"]
    for n, (what, files) in enumerate(places.items(), 1):
        where = "; ".join(f"{file}:{', '.join(at)}" for file, at in files.items())
        lines += [f"{n}. {what}", f"   needed at {where}"]
    return "\n".join([*lines, TINY_HINT])
