"""OpenAI fine-tuning (`/v1/files`, `/v1/fine_tuning/jobs`) through the official client.

The job is created with the `supervised` method and the spec's hyperparameters (n_epochs,
batch_size, learning_rate_multiplier), its `suffix` and the stage's `seed`. Events are read
newest first, page by page, until one already seen.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from harness.lab.finetuning.jobs import (
    CANCELLED,
    FAILED,
    PENDING,
    RUNNING,
    SUCCEEDED,
    Event,
    Job,
    JobRequest,
    JobsClient,
    only,
)

HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
STATUS = {
    "validating_files": PENDING,
    "queued": PENDING,
    "running": RUNNING,
    "succeeded": SUCCEEDED,
    "failed": FAILED,
    "cancelled": CANCELLED,
}
PAGE = 100  # events or jobs per listing call


class OpenAIJobs(JobsClient):
    name = "openai"
    hyperparameters = HYPERPARAMETERS

    def _upload(self, path: Path) -> tuple[str, float]:
        with path.open("rb") as file:
            uploaded = self.calls.client.files.create(file=file, purpose="fine-tune")
        return uploaded.id, float(uploaded.created_at)

    def _create(self, request: JobRequest) -> Job:
        hyperparameters = only(request.hyperparameters, HYPERPARAMETERS)
        job = self.calls.client.fine_tuning.jobs.create(
            model=request.model,
            training_file=request.file_id,
            method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
            seed=request.seed,
            **({"suffix": request.suffix} if request.suffix else {}),
        )
        return _job(job)

    def _retrieve(self, job_id: str) -> Job:
        return _job(self.calls.client.fine_tuning.jobs.retrieve(job_id))

    def _jobs_for_file(self, file_id: str, file_created_at: float) -> list[Job]:
        found: list[Job] = []
        after: dict[str, str] = {}
        while True:
            page = self.calls.client.fine_tuning.jobs.list(limit=PAGE, **after)
            for job in page.data:
                if job.created_at < file_created_at:  # newest first: the rest predate the file
                    return found
                if job.training_file == file_id:
                    found.append(_job(job))
            if not page.has_more or not page.data:
                return found
            after = {"after": page.data[-1].id}

    def _new_events(self, job_id: str, seen: Collection[str]) -> list[Event]:
        fresh: list[Event] = []
        after: dict[str, str] = {}
        while True:
            page = self.calls.client.fine_tuning.jobs.list_events(job_id, limit=PAGE, **after)
            for event in page.data:  # newest first
                if event.id in seen:
                    return fresh[::-1]
                fresh.append(Event(event.id, str(event.created_at), event.level, event.message, event.type))
            if not page.has_more or not page.data:
                return fresh[::-1]
            after = {"after": page.data[-1].id}


def _job(job: Any) -> Job:
    supervised = getattr(getattr(job, "method", None), "supervised", None)
    reported = getattr(supervised, "hyperparameters", None) or job.hyperparameters
    return Job(
        id=job.id,
        status=STATUS.get(job.status, RUNNING),  # a status added later: not ended, keep polling
        provider_status=job.status,
        training_file=job.training_file,
        created_at=float(job.created_at),
        fine_tuned_model=job.fine_tuned_model,
        trained_tokens=job.trained_tokens,
        error=job.error.message if job.error else None,
        hyperparameters=reported.model_dump(exclude_none=True) if reported else {},
    )
