"""Progress of a stage's long loops: throttled lines with a rate and the time left.

    progress = ctx.progress("training", "steps")
    for step in range(total):
        ...
        progress(step + 1, total)

logs `training: 120/400 steps, 3.1 steps/s, ~1m30s left` every 5 seconds at first, then
every tenth of the time elapsed (at most a minute apart), and `training: 400/400 steps in
2m10s (3.1 steps/s)` when done. The lines go where the stage's log goes (stage.log, the
terminal), never into its metrics or artifacts.

`aside()` marks work done while a stage runs that is not the stage's own (a fixture model
built once and cached for every later run): reported on its own lines, its time is left out
of the stage's duration.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sized
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
Clock = Callable[[], float]
Log = Callable[[str], None]


class Progress:
    """A `progress(done, total)` callback (what the lab's loops take) that logs throttled lines.

    The rate counts from the first update, so work already done when the loop starts (a
    resumed run, cached responses) does not inflate it."""

    def __init__(
        self,
        log: Log,
        what: str,
        unit: str = "items",
        total: int | None = None,
        *,
        every: float = 5.0,
        clock: Clock = time.monotonic,
    ):
        self.log, self.what, self.unit, self.total = log, what, unit, total
        self.every = every
        self.clock = clock
        self.started = self._shown = clock()
        self._first: tuple[float, int] | None = None  # (time, done) of the first update
        self._finished = False

    def __call__(self, done: int, total: int | None = None, detail: str = "") -> None:
        """`done` of `total` (given here or to the constructor); `detail` ends the line (a loss)."""
        if total is not None:
            self.total = total
        now = self.clock()
        if self._first is None:
            self._first = (now, done)
        if self.total is not None and done >= self.total:
            if not self._finished:
                self._finished = True
                self.log(self._final(done, now, detail))
            return
        if now - self._shown < min(max(self.every, (now - self.started) / 10), 60.0):
            return
        self._shown = now
        parts = [f"{self.what}: {done}/{self.total or '?'} {self.unit}"]
        rate = self._rate(done, now)
        if rate:
            parts.append(per_time(rate, self.unit))
            if self.total:
                parts.append(f"~{duration((self.total - done) / rate)} left")
        self.log(", ".join(parts) + (f" ({detail})" if detail else ""))

    def track(self, items: Iterable[T]) -> Iterator[T]:
        """`items`, counting each one done when the loop asks for the next."""
        if self.total is None:
            if not isinstance(items, Sized):
                raise TypeError(f"{self.what}: give the total of an iterable without len()")
            self.total = len(items)
        count = 0
        for item in items:
            yield item
            count += 1
            self(count)

    def _rate(self, done: int, now: float) -> float:
        first_time, first_done = self._first or (now, done)
        return (done - first_done) / (now - first_time) if done > first_done and now > first_time else 0.0

    def _final(self, done: int, now: float, detail: str) -> str:
        rate = self._rate(done, now)
        shown = [per_time(rate, self.unit)] if rate else []
        shown += [detail] if detail else []
        extra = f" ({', '.join(shown)})" if shown else ""
        return f"{self.what}: {done}/{self.total} {self.unit} in {duration(now - self.started)}{extra}"


def duration(seconds: float) -> str:
    """`0.4s`, `42s`, `3m05s`, `2h07m`."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def per_time(rate: float, unit: str) -> str:
    """A rate per second, or per minute or hour when slower than one a second or minute."""
    scale, per = (1, "s") if rate >= 1 else (60, "min") if rate * 60 >= 1 else (3600, "h")
    value = rate * scale
    return f"{value:,.0f} {unit}/{per}" if value >= 100 else f"{value:.1f} {unit}/{per}"


@dataclass
class _Running:
    """The stage running in this context: where `aside` reports, and the time it set aside."""

    log: Log
    set_aside: float = 0.0


_RUNNING: ContextVar[_Running | None] = ContextVar("harness_running_stage", default=None)


@contextmanager
def running_stage(log: Log) -> Iterator[_Running]:
    """Run a stage's code inside: `aside` blocks report to `log`, and `.set_aside` says how
    long they took (the engine takes it out of the stage's duration)."""
    token = _RUNNING.set(running := _Running(log))
    try:
        yield running
    finally:
        _RUNNING.reset(token)


@contextmanager
def aside(clock: Clock = time.perf_counter) -> Iterator[Log]:
    """Work that is not the running stage's own (a fixture model built once and cached):
    yields the log to report it on (the stage's, or print outside a stage); its time is
    left out of the stage's duration."""
    running = _RUNNING.get()
    started = clock()
    try:
        yield running.log if running else print
    finally:
        if running:
            running.set_aside += clock() - started
