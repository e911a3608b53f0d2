"""Together AI fine-tuning (`/v1/files`, `/v1/fine-tunes`) through its official client, the
`together` package (an optional dependency: pip install 'harness[together]').

The job is created with the spec's hyperparameters under Together's names (n_epochs,
batch_size, learning_rate, warmup_ratio, lora, lora_r, lora_alpha, lora_dropout,
lora_trainable_modules, train_on_inputs), its `suffix` and the stage's seed as
`random_seed`. A job continuing an earlier one starts `from_checkpoint` that job's model.
The client checks the uploaded file's format itself, and asks the API for the model's
limits and a price estimate as part of creating the job. Together's events carry no id:
each gets one derived from its content (jobs.content_ids).
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
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
    content_ids,
    only,
)

HYPERPARAMETERS = (
    "n_epochs",
    "batch_size",
    "learning_rate",
    "warmup_ratio",
    "lora",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_trainable_modules",
    "train_on_inputs",
)
STATUS = {
    "pending": PENDING,
    "queued": PENDING,
    "running": RUNNING,
    "compressing": RUNNING,
    "uploading": RUNNING,
    "cancel_requested": RUNNING,
    "completed": SUCCEEDED,
    "error": FAILED,
    "cancelled": CANCELLED,
}


class TogetherJobs(JobsClient):
    name = "together"
    hyperparameters = HYPERPARAMETERS

    def _upload(self, path: Path) -> tuple[str, float]:
        uploaded = self.calls.client.files.upload(path, purpose="fine-tune")
        return uploaded.id, float(uploaded.created_at)

    def _create(self, request: JobRequest) -> Job:
        start = {"from_checkpoint": request.model} if request.continues else {"model": request.model}
        hyperparameters = {"train_on_inputs": "auto", **only(request.hyperparameters, HYPERPARAMETERS)}
        if any(name.startswith("lora_") for name in hyperparameters):
            hyperparameters.setdefault("lora", True)  # else the client drops the LoRA settings
        job = self.calls.client.fine_tuning.create(
            training_file=request.file_id,
            **start,
            **hyperparameters,
            random_seed=request.seed,
            **({"suffix": request.suffix} if request.suffix else {}),
        )
        return _job(_plain(job))

    def _retrieve(self, job_id: str) -> Job:
        return _job(_plain(self.calls.client.fine_tuning.retrieve(job_id)))

    def _jobs_for_file(self, file_id: str, file_created_at: float) -> list[Job]:
        jobs = [_job(_plain(job)) for job in self.calls.client.fine_tuning.list().data]
        mine = [job for job in jobs if job.training_file == file_id]
        return sorted(mine, key=lambda job: job.created_at or 0.0, reverse=True)

    def _new_events(self, job_id: str, seen: Collection[str]) -> list[Event]:
        listed = [_plain(event) for event in self.calls.client.fine_tuning.list_events(job_id).data]
        listed.sort(key=lambda event: str(event.get("created_at") or ""))  # oldest first, however listed
        events = [
            Event(
                event_id,
                str(e.get("created_at")),
                str(e.get("level") or "info"),
                str(e.get("message")),
                e.get("type"),
            )
            for event_id, e in zip(content_ids(listed, job_id), listed, strict=True)
        ]
        return [event for event in events if event.id not in seen]


def _plain(model: Any) -> dict[str, Any]:
    """A response object as the JSON it came as (the client's models disagree on field names)."""
    return model.model_dump(mode="json", by_alias=True, warnings=False)


def _job(job: dict[str, Any]) -> Job:
    reported = only(job, HYPERPARAMETERS) | {"training_type": job.get("training_type")}
    return Job(
        id=job["id"],
        status=STATUS.get(str(job.get("status")), RUNNING),  # a status added later: not ended, keep polling
        provider_status=str(job.get("status")),
        training_file=job.get("training_file"),
        created_at=_unix_seconds(job.get("created_at")),
        fine_tuned_model=job.get("model_output_name"),
        trained_tokens=job.get("token_count"),
        error=None,  # Together says why in the job's events (level error)
        hyperparameters={name: value for name, value in reported.items() if value is not None},
    )


def _unix_seconds(stamp: Any) -> float | None:
    """An ISO 8601 time as unix seconds; None when it is not one."""
    try:
        return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
