"""`finetune_api`: fine-tune a model through a provider's API (OpenAI or Together).

    training rows (the `data` upstream's dataset.jsonl, or the `data` file)
      -> every row checked against the provider's format and limits (file:line)
      -> tokens estimated, cost = tokens x epochs x price; refused over `max_cost_usd`
      -> (dry_run stops here) -> upload -> create the job -> poll until it ends
      -> finetuned_model.json, events.jsonl, preflight.json

The rows and their checks, token estimate and prices are `harness.lab.finetuning.data`'s;
the clients and their retries are `harness.lab.finetuning`'s.

Never two paid jobs for one stage: the uploaded file's id goes to `scratch_dir/job.json`
(atomically) as soon as the upload returns, the job's id before the first poll. A rerun
after a crash or a kill does not upload again, and resumes polling the job it finds there.
A run killed between the create call and writing its id finds the job by listing the
provider's jobs on its uploaded file (a file no other stage uses) before creating one; a
create call whose answer is lost is recovered the same way (harness.lab.finetuning.jobs).
A job that failed or was cancelled fails the stage with the provider's message; it is not
resumed, so the next run starts a new job from the same uploaded file.

The job's events are logged as they arrive and kept in the scratch directory, so a
resumed run logs only the new ones and events.jsonl has them all. Polling waits
`poll.interval` seconds, longer by `poll.backoff` each time nothing changed (up to
`poll.max_interval`), and gives up after `poll.timeout` seconds, leaving the job running: a
rerun resumes it.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.api import stage_kind
from harness.core.stage import Estimate, ParamError, Role, StageContext, StageError
from harness.core.store import read_json, write_json, write_jsonl, write_text_atomic
from harness.core.upstream import FINETUNED_MODEL, find_upstream
from harness.lab.documents import DATASET_FILE, Journal
from harness.lab.finetuning import (
    CLIENTS,
    SUCCEEDED,
    Job,
    JobRequest,
    JobsClient,
    ProviderConfigError,
    accepted_hyperparameters,
    check_provider,
    open_client,
)
from harness.lab.finetuning.data import (
    DEFAULT_MAX_EXAMPLE_TOKENS,
    MESSAGE_OVERHEAD,
    TOKEN_MARGIN,
    TrainingSet,
    epochs_for_estimate,
    price_per_million,
    read_training_set,
)

METRICS = ("n_rows", "n_tokens", "n_epochs", "estimated_cost_usd", "trained_tokens", "n_events", "dry_run")
DATA, BASE_MODEL = "data", "base_model"
ACCEPTED_WORDS = {"openai": ("auto",), "together": ("max",)}  # batch_size / n_epochs words


# ---- params -------------------------------------------------------------------------------


def roles(params: Mapping[str, Any]) -> tuple[Role, ...]:
    """The stage whose dataset.jsonl it trains on, unless the `data` param names a file; and
    optionally an earlier finetune_api stage whose model it trains further."""
    data = (
        () if params.get("data") else (Role(DATA, f"the {DATASET_FILE} of a build_dataset stage", only=True),)
    )
    return (
        *data,
        Role(BASE_MODEL, f"the {FINETUNED_MODEL} of a finetune_api stage to train further", optional=True),
    )


def check(params: Mapping[str, Any], spec_dir: Path) -> None:
    provider = params["provider"]["name"]
    try:
        # a dry run sends nothing
        check_provider(params["provider"], needs_key=not params["dry_run"], at=("provider",))
    except ProviderConfigError as exc:
        raise ParamError(("provider",), str(exc)) from None
    hyperparameters = params["hyperparameters"]
    accepted = accepted_hyperparameters(provider)
    for name in hyperparameters:
        if name not in accepted:
            takers = "/".join(other for other in CLIENTS if name in accepted_hyperparameters(other))
            raise ParamError(
                ("hyperparameters", name),
                f"{name} is a {takers} hyperparameter; provider {provider} does not take it",
            )
    for name in ("n_epochs", "batch_size"):
        value = hyperparameters.get(name)
        if isinstance(value, str) and value not in ACCEPTED_WORDS[provider]:
            raise ParamError(
                ("hyperparameters", name), f"provider {provider} does not take {name}: {value!r}"
            )
    if params.get("max_cost_usd") is not None:
        price, _ = price_per_million(provider, params["model"], params.get("price_per_million_tokens"))
        if price is None:
            raise ParamError(
                ("max_cost_usd",),
                f"no training price known for {provider} model {params['model']!r}, so `max_cost_usd` cannot "
                "be checked: set price_per_million_tokens (USD per million training tokens, from the "
                "provider's pricing page)",
            )


# ---- inputs -------------------------------------------------------------------------------


def training_file(ctx: StageContext) -> Path:
    """The rows to train on: the `data` upstream's dataset.jsonl, or the `data` file."""
    given = ctx.params.get("data")
    sources = {role: up for role, up in ctx.upstream.items() if role != BASE_MODEL}
    if given and sources:
        raise StageError(
            f"stage {ctx.stage!r} has both an upstream stage and a `data` file; keep one: "
            f"`needs: {{{DATA}: <stage>}}` to train on a stage's {DATASET_FILE}, or `data:` for a file"
        )
    if given:
        return Path(given)
    if not sources:
        raise StageError(
            f"stage {ctx.stage!r} has no training data: add `needs: {{{DATA}: <build_dataset stage>}}` "
            "or a `data:` jsonl file"
        )
    upstream = find_upstream(sources, DATA, "finetune_api")
    path = upstream.dir / DATASET_FILE
    if not path.is_file():
        raise StageError(
            f"upstream stage {upstream.name!r} (kind {upstream.kind}) wrote no {DATASET_FILE} in "
            f"{upstream.dir}; finetune_api trains on the {DATASET_FILE} of a build_dataset stage"
        )
    return path


def start_model(ctx: StageContext) -> tuple[str, bool]:
    """The model the job starts from, and whether it is an earlier job's result: the
    `base_model` upstream's fine-tuned model, else the `model` param."""
    upstream = ctx.upstream.get(BASE_MODEL)
    if upstream is None:
        return ctx.params["model"], False
    earlier = read_json(upstream.dir / FINETUNED_MODEL)
    if not isinstance(earlier, dict) or earlier.get("status") != SUCCEEDED or not earlier.get("model_id"):
        state = earlier.get("status") if isinstance(earlier, dict) else "no readable file"
        raise StageError(
            f"upstream stage {upstream.name!r} in role {BASE_MODEL} gives no fine-tuned model "
            f"({upstream.dir / FINETUNED_MODEL}: {state}); it must be a finetune_api stage whose job "
            "succeeded"
        )
    provider = ctx.params["provider"]["name"]
    if earlier.get("provider") != provider:
        raise StageError(
            f"upstream stage {upstream.name!r} fine-tuned on {earlier.get('provider')}, this stage on "
            f"{provider}: a model is trained further with the provider that made it"
        )
    return str(earlier["model_id"]), True


# ---- the estimate -------------------------------------------------------------------------


@dataclass(frozen=True)
class Preflight:
    """What the checks and the estimate found, before anything is sent (preflight.json)."""

    provider: str
    model: str
    data: str
    format: str
    n_rows: int
    n_tokens: int  # estimated
    n_epochs: int
    price_per_million_tokens: float | None
    price_source: str
    estimated_cost_usd: float | None
    max_cost_usd: float | None
    ignored_fields: dict[str, int]
    dry_run: bool
    token_estimate: str = (
        f"an estimate, no tokenizer being available offline: words and punctuation marks x {TOKEN_MARGIN} "
        f"+ {MESSAGE_OVERHEAD} per chat message, leaning high"
    )

    @classmethod
    def of(cls, ctx: StageContext, training: TrainingSet) -> Preflight:
        p = ctx.params
        provider = p["provider"]["name"]
        epochs = epochs_for_estimate(p["hyperparameters"]["n_epochs"], len(training.rows))
        price, source = price_per_million(provider, p["model"], p.get("price_per_million_tokens"))
        cost = None if price is None else training.n_tokens * epochs * price / 1e6
        return cls(
            provider=provider,
            model=p["model"],
            data=str(training.path),
            format=training.format,
            n_rows=len(training.rows),
            n_tokens=training.n_tokens,
            n_epochs=epochs,
            price_per_million_tokens=price,
            price_source=source,
            estimated_cost_usd=cost,
            max_cost_usd=p.get("max_cost_usd"),
            ignored_fields=training.ignored_fields,
            dry_run=bool(p["dry_run"]),
        )

    def describe(self) -> str:
        cost = "unknown (no price)" if self.estimated_cost_usd is None else usd(self.estimated_cost_usd)
        return (
            f"{self.n_rows} rows ({self.format}), about {self.n_tokens} tokens (estimated) x {self.n_epochs} "
            f"epochs: estimated cost {cost} at {self.price_per_million_tokens} USD per million tokens "
            f"({self.price_source})"
        )


# ---- the job's state in the scratch directory ---------------------------------------------


@dataclass
class JobState:
    """What must survive a crash so that a rerun never pays twice (scratch_dir/job.json)."""

    upload_sha256: str
    file_id: str | None = None
    file_created_at: float | None = None
    job_id: str | None = None
    ended_jobs: list[str] = field(default_factory=list)  # failed or cancelled: never resumed

    @classmethod
    def load(cls, path: Path, upload_sha256: str) -> JobState:
        saved = read_json(path)
        if isinstance(saved, dict) and saved.get("upload_sha256") == upload_sha256:
            return cls(**saved)
        return cls(upload_sha256)  # nothing saved, or for other data (cannot be, for one key)

    def save(self, path: Path) -> None:
        write_json(path, asdict(self))


# ---- the stage ----------------------------------------------------------------------------


def estimate(params: Mapping[str, Any]) -> Estimate | None:
    """One job training on the `data` file's estimated tokens x epochs, priced as the run's own
    budget check prices it; unknown in size when the rows come from an upstream stage."""
    if params["dry_run"]:
        return None  # nothing is sent
    provider = params["provider"]["name"]
    price, _ = price_per_million(provider, params["model"], params.get("price_per_million_tokens"))
    if "data" not in params:
        return Estimate(1, None, 0, None, "training rows from the upstream stage: size known when it has run")
    limit = params.get("max_example_tokens", DEFAULT_MAX_EXAMPLE_TOKENS[provider])
    training = read_training_set(Path(params["data"]), provider, limit)
    epochs = epochs_for_estimate(params["hyperparameters"]["n_epochs"], len(training.rows))
    tokens = training.n_tokens * epochs
    cost = None if price is None else tokens * price / 1e6
    return Estimate(1, tokens, 0, cost, f"one job: {training.n_tokens:,} training tokens x {epochs} epochs")


@stage_kind(
    needs=roles,
    metrics=METRICS,
    input_params=("data",),
    # how the stage talks to the provider, and the budget check: a job already paid for is
    # not trained again because a timeout, a price or the budget was edited
    transport_params=(
        "provider.timeout",
        "provider.max_tries",
        "poll",
        "max_cost_usd",
        "price_per_million_tokens",
    ),
    check=check,
    estimate=estimate,
)
def run(ctx: StageContext) -> Mapping[str, Any]:
    p = ctx.params
    provider = p["provider"]["name"]
    limit = p.get("max_example_tokens", DEFAULT_MAX_EXAMPLE_TOKENS[provider])
    training = read_training_set(training_file(ctx), provider, limit)
    model, continues = start_model(ctx)
    preflight = Preflight.of(ctx, training)
    write_json(ctx.out_dir / "preflight.json", asdict(preflight))
    ctx.log(preflight.describe())
    if training.ignored_fields:
        ignored = ", ".join(f"{name} ({n} rows)" for name, n in sorted(training.ignored_fields.items()))
        ctx.log(f"fields {provider} does not take are left out of the upload: {ignored}")
    cost, budget = preflight.estimated_cost_usd, preflight.max_cost_usd
    if budget is not None and cost is not None and cost > budget:
        raise StageError(
            f"estimated cost {usd(cost)} is over max_cost_usd {usd(budget)} ({preflight.describe()}); "
            "nothing was uploaded. Raise max_cost_usd, or train on fewer rows or epochs"
        )
    metrics = {
        "n_rows": preflight.n_rows,
        "n_tokens": preflight.n_tokens,
        "n_epochs": preflight.n_epochs,
        "estimated_cost_usd": cost,
        "trained_tokens": None,
        "n_events": 0,
        "dry_run": int(preflight.dry_run),
    }
    record = {
        "provider": provider,
        "endpoint": p["provider"].get("base_url"),
        "base_model": model,
        "continues": continues,
        "hyperparameters": p["hyperparameters"],
        "suffix": p.get("suffix"),
        "seed": ctx.seed,
    }
    if preflight.dry_run:
        ctx.log("dry run: nothing uploaded, no job created")
        write_json(
            ctx.out_dir / FINETUNED_MODEL,
            {**record, "status": "dry_run", "model_id": None, "job_id": None, "file_id": None},
        )
        return metrics
    with open_client(p["provider"], log=ctx.log) as client:
        job, state, events = train(ctx, client, training, model, continues)
    write_jsonl(ctx.out_dir / "events.jsonl", events)
    write_json(
        ctx.out_dir / FINETUNED_MODEL,
        {
            **record,
            "status": job.status,
            "model_id": job.fine_tuned_model,
            "job_id": job.id,
            "file_id": state.file_id,
            "provider_status": job.provider_status,
            "reported_hyperparameters": job.hyperparameters,
            "trained_tokens": job.trained_tokens,
        },
    )
    if job.status != SUCCEEDED:
        raise StageError(
            f"fine-tuning job {job.id} {job.provider_status}: {why_it_ended(job, events).rstrip('.')}. "
            f"A rerun starts a new job on the uploaded file {state.file_id}"
        )
    if not job.fine_tuned_model:
        raise StageError(f"fine-tuning job {job.id} succeeded but the provider named no fine-tuned model")
    ctx.log(f"fine-tuned model: {job.fine_tuned_model}")
    return {**metrics, "trained_tokens": job.trained_tokens, "n_events": len(events)}


def why_it_ended(job: Job, events: list[dict[str, Any]]) -> str:
    """The provider's word for a job that did not succeed: its error, else its last error
    event (Together says it there), else its last event."""
    errors = [event["message"] for event in events if event["level"] == "error"]
    last = errors or [event["message"] for event in events]
    return job.error or (last[-1] if last else "the provider gave no reason")


def train(
    ctx: StageContext, client: JobsClient, training: TrainingSet, model: str, continues: bool
) -> tuple[Job, JobState, list[dict[str, Any]]]:
    """Upload, create (or find) the job training `model` further (`continues`: an earlier
    job's model) and poll it until it ends: the job as it ended, the state saved for a
    rerun, and the job's events."""
    text = training.jsonl()
    state_file = ctx.scratch_dir / "job.json"
    state = JobState.load(state_file, hashlib.sha256(text.encode()).hexdigest())
    uploaded_now = state.file_id is None
    if uploaded_now:
        upload = ctx.scratch_dir / f"{_safe(ctx.stage)}.jsonl"  # a copy: the user's file is never touched
        write_text_atomic(upload, text)
        state.file_id, state.file_created_at = client.upload(upload)
        state.save(state_file)
        ctx.log(f"uploaded {len(training.rows)} rows as file {state.file_id}")
    else:
        ctx.log(f"resuming: the training file was uploaded before, as {state.file_id}")
    job = None
    if state.job_id is not None:
        job = client.retrieve(state.job_id)
        ctx.log(f"resuming job {job.id} ({job.provider_status})")
    elif not uploaded_now:  # a run killed after its create call may have left a job
        job = client.live_job_on_file(state.file_id, state.file_created_at or 0.0, state.ended_jobs)
        if job is not None:
            ctx.log(f"resuming job {job.id} ({job.provider_status}), created by an interrupted run")
    if job is None:
        p = ctx.params
        request = JobRequest(state.file_id, model, continues, p["hyperparameters"], p.get("suffix"), ctx.seed)
        job = client.create(request, state.file_created_at or 0.0, state.ended_jobs)
        ctx.log(f"created job {job.id} on {model} ({job.provider_status})")
    state.job_id = job.id
    state.save(state_file)
    job, events = follow(ctx, client, job)
    if job.status != SUCCEEDED:  # not resumed: the next run starts a new job
        state.ended_jobs.append(job.id)
        state.job_id = None
        state.save(state_file)
    return job, state, events


def follow(ctx: StageContext, client: JobsClient, job: Job) -> tuple[Job, list[dict[str, Any]]]:
    """Poll `job` until it ends, logging its events as they arrive: the job as it ended and
    all its events (those a killed run saw included), oldest first."""
    poll = ctx.params["poll"]
    journal = Journal(ctx.scratch_dir / f"events-{_safe(job.id)}.jsonl")
    events = journal.rows()
    seen = {event["id"] for event in events}
    if events:
        ctx.log(f"{len(events)} events of job {job.id} were logged by an interrupted run")
    interval = float(poll["interval"])
    deadline = time.monotonic() + float(poll["timeout"])
    status = None
    while True:
        fresh = [event.to_json() for event in client.new_events(job.id, seen)]
        journal.append(fresh)
        events += fresh
        seen.update(event["id"] for event in fresh)
        for event in fresh:
            ctx.log(f"[{job.id}] {event['level']}: {event['message']}")
        changed = bool(fresh) or job.provider_status != status
        if job.provider_status != status:
            ctx.log(f"job {job.id}: {job.provider_status}")
            status = job.provider_status
        # soon again while the job moves, less and less often while it does not
        interval = (
            float(poll["interval"]) if changed else min(interval * poll["backoff"], poll["max_interval"])
        )
        if job.ended:
            return job, events
        if time.monotonic() + interval > deadline:
            raise StageError(
                f"job {job.id} is still {job.provider_status} after poll.timeout ({poll['timeout']} s); "
                "it goes on at the provider: rerun the stage to resume polling it"
            )
        time.sleep(interval)
        job = client.retrieve(job.id)


def usd(amount: float) -> str:
    """Dollars to the cent, and small amounts to two significant digits ($0.0012)."""
    return f"${amount:.2f}" if amount >= 0.01 or amount == 0 else f"${amount:.2g}"


def _safe(name: str) -> str:
    """`name` usable as a file name."""
    return re.sub(r"[^\w.-]", "_", name)
