"""What both providers' fine-tuning clients do, in one vocabulary: a job's status, its
events, and a create call that never leaves two jobs behind.

A create call whose answer is lost (a 5xx or a timeout after the provider made the job) is
not simply sent again: before each retry, the jobs already training on the same uploaded
file are listed, and one found is taken as the job this call made. The uploaded file is
this stage's own, so a job on it can only be its own. (Neither client sends an idempotency
key, and neither provider documents one for fine-tuning jobs.)
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.lab.finetuning.calls import Calls

PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED = "pending", "running", "succeeded", "failed", "cancelled"
ENDED = frozenset({SUCCEEDED, FAILED, CANCELLED})


@dataclass(frozen=True)
class Job:
    """A fine-tuning job as the provider reported it last."""

    id: str
    status: str  # pending, running, succeeded, failed or cancelled, whatever the provider's word
    provider_status: str  # the provider's own word: validating_files, queued, compressing, ...
    training_file: str | None
    created_at: float | None  # unix seconds
    fine_tuned_model: str | None = None  # the model id to sample from, once succeeded
    trained_tokens: int | None = None  # as the provider counted them, when it says
    error: str | None = None  # the provider's message for a failed job, when it gives one
    hyperparameters: dict[str, Any] = field(default_factory=dict)  # as the provider reports them

    @property
    def ended(self) -> bool:
        return self.status in ENDED


@dataclass(frozen=True)
class Event:
    """One event of a job's log, as the provider wrote it."""

    id: str  # the provider's, or derived from the content where it gives none
    created_at: str  # as the provider wrote it (ISO 8601, or unix seconds)
    level: str
    message: str
    type: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class JobRequest:
    """What a job is created with."""

    file_id: str
    model: str  # the base model, or the fine-tuned model to continue training
    continues: bool  # whether `model` is the result of an earlier fine-tuning job
    hyperparameters: Mapping[str, Any]  # the spec's, under the provider's names
    suffix: str | None
    seed: int


class JobsClient(ABC):
    """A provider's fine-tuning API through its official client. Made by
    `harness.lab.finetuning.open_client`; every call goes through `self.calls`."""

    name: str
    hyperparameters: tuple[str, ...]  # the ones its API takes, under the spec's names

    def __init__(self, calls: Calls):
        self.calls = calls

    def close(self) -> None:
        self.calls.client.close()

    def upload(self, path: Path) -> tuple[str, float]:
        """Upload the jsonl at `path` for fine-tuning: its file id and creation time."""
        return self.calls.run("upload the training file", lambda: self._upload(path))

    def create(self, request: JobRequest, file_created_at: float, ended: Collection[str] = ()) -> Job:
        """Create the job; a lost answer is recovered, not repeated (module docstring). Jobs in
        `ended` (failed or cancelled ones of earlier runs, on the same file) are not it."""
        return self.calls.run(
            "create the fine-tuning job",
            lambda: self._create(request),
            lambda: self._live_job_on_file(request.file_id, file_created_at, ended),
        )

    def live_job_on_file(self, file_id: str, file_created_at: float, ended: Collection[str]) -> Job | None:
        """The newest job on the file that is not among `ended`: one an interrupted run made."""
        return self.calls.run(
            "list the jobs", lambda: self._live_job_on_file(file_id, file_created_at, ended)
        )

    def _live_job_on_file(self, file_id: str, file_created_at: float, ended: Collection[str]) -> Job | None:
        return next((j for j in self._jobs_for_file(file_id, file_created_at) if j.id not in ended), None)

    def retrieve(self, job_id: str) -> Job:
        return self.calls.run(f"poll job {job_id}", lambda: self._retrieve(job_id))

    def new_events(self, job_id: str, seen: Collection[str]) -> list[Event]:
        """The job's events not in `seen` (by id), oldest first."""
        return self.calls.run(f"read the events of job {job_id}", lambda: self._new_events(job_id, seen))

    @abstractmethod
    def _upload(self, path: Path) -> tuple[str, float]: ...

    @abstractmethod
    def _create(self, request: JobRequest) -> Job: ...

    @abstractmethod
    def _retrieve(self, job_id: str) -> Job: ...

    @abstractmethod
    def _jobs_for_file(self, file_id: str, file_created_at: float) -> list[Job]: ...

    @abstractmethod
    def _new_events(self, job_id: str, seen: Collection[str]) -> list[Event]: ...


def content_ids(events: list[dict[str, Any]], prefix: str) -> list[str]:
    """Ids for events a provider gives none: a digest of each one's content, numbered when
    the same content comes again, so an id stays the same from one listing to the next."""
    counts: dict[str, int] = {}
    ids = []
    for event in events:
        digest = hashlib.sha256(json.dumps(event, sort_keys=True, default=str).encode()).hexdigest()[:16]
        counts[digest] = counts.get(digest, 0) + 1
        ids.append(f"{prefix}-{digest}-{counts[digest]}")
    return ids


def only(mapping: Mapping[str, Any], names: Collection[str]) -> dict[str, Any]:
    """The entries of `mapping` named in `names`."""
    return {name: value for name, value in mapping.items() if name in names}
