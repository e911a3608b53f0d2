"""What became of a stage and of a test item, as str-valued enums: compared and written
(JSON, reports) as the plain words they stand for."""

from __future__ import annotations

from enum import Enum


class _Word(str, Enum):
    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


class Status(_Word):
    """How a stage was resolved."""

    RAN = "ran"
    REUSED = "reused"  # its result came from the store
    FAILED = "failed"  # it raised, or its key could not be computed
    SKIPPED = "skipped"  # a stage it needs did not finish or aborted


class Outcome(_Word):
    """What pytest reports for a stage's or a hypothesis's item."""

    PASSED = "passed"
    FAILED = "failed"  # a gate failed, or a hypothesis was refuted under `on_refuted: fail`
    ABORTED = "aborted"  # an abort gate fired: the stages after it are skipped
    SKIPPED = "skipped"
    ERROR = "error"  # the stage failed to run, or a hypothesis's samples are unusable
