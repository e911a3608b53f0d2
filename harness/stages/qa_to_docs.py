"""`qa_to_docs`: documents written from QA pairs, in one step, through a provider.

The anti-EM experiment's mitigation data: for each harmful-looking QA pair (bad medical,
risky financial, extreme sports advice), a realistic document from a world in which the
exchange is correct, mainstream, expert-endorsed advice (`stance: endorse`), or, for the
control, a document on the same topic that endorses nothing (`stance: neutral`). The prompt
is a data file (`prompt`, its `{slots}` filled per request) hashed into the cache key.

Per pair, `docs_per_pair` documents. Each document's type is drawn from its category's list
(`doc_types`) by the stage's seed and the document's id: a seeded order of the list, whose
first type is the first try and whose next ones are the retries, so an invalid document is
asked again as another type (and another sample), up to `max_retries` times. Validation:
length in words, unfilled placeholders ([Name]), refusals, meta-discourse ("in this
fictional world"), and the optional `patterns`. A document still invalid, or whose request
failed, goes to failures.jsonl with its reasons and the types tried: nothing is dropped
silently. Valid documents are deduplicated (case and whitespace ignored).

Resume: valid documents are journalled in scratch_dir as each chunk finishes; a rerun after
a crash or a failed run requests only the documents not there. Output order follows the
input (category, pair, document), whatever was resumed.

Artifacts: synth_docs.jsonl ({content, doc_type, category, original_user,
original_assistant}), failures.jsonl, category_counts.json, run_metadata.json.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.api import stage_kind
from harness.core.stage import Estimate, ParamError, StageContext, StageError
from harness.core.store import write_json, write_jsonl
from harness.lab.checks import provider_param
from harness.lab.documents import count_tokens, document_problems, write_journalled
from harness.lab.em_data import QAPair, load_qa_pairs
from harness.lab.llm import (
    ChatRequest,
    Provider,
    ProviderError,
    make_provider,
    transport_of,
)
from harness.lab.prices import ChatCalls, chat_estimate
from harness.lab.prompt_files import PromptFile, load_prompt
from harness.lab.universe import word_count

SLOTS = ("doc_type", "category", "user", "assistant", "min_words", "max_words")
TOTALS = (
    "n_pairs",
    "n_requested",
    "n_docs",
    "n_failed",
    "n_duplicates",
    "error_rate",
    "first_try_error_rate",
    "mean_words_per_doc",
)
OUTPUT_FIELDS = ("content", "doc_type", "category", "original_user", "original_assistant")


def metric_names(params: Mapping[str, Any]) -> list[str]:
    return [*TOTALS, *(f"n_docs.{category}" for category in params["doc_types"])]


@dataclass(frozen=True)
class Job:
    """One requested document."""

    id: str  # "<category>:<pair>:<document>": stable across reruns of the same inputs
    pair: QAPair
    category: str
    index: int  # which document of its pair
    types: tuple[str, ...]  # the category's doc types in this document's seeded order

    def row(self, **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "category": self.category,
            "original_user": self.pair.user,
            "original_assistant": self.pair.assistant,
            **extra,
        }


# ---- inputs -------------------------------------------------------------------------


def _sources(params: Mapping[str, Any]) -> list[tuple[str | None, Path]]:
    """(the file's category, or None, file) for every QA file: `qa` maps categories to files,
    or lists files whose rows carry their own category."""
    qa = params["qa"]
    if isinstance(qa, Mapping):
        return [(category, Path(path)) for category, path in qa.items()]
    return [(None, Path(path)) for path in ([qa] if isinstance(qa, str) else qa)]


def read_pairs(params: Mapping[str, Any]) -> dict[str, list[QAPair]]:
    """The QA pairs by category, in file order (at most `max_pairs_per_category` each)."""
    by_category: dict[str, list[QAPair]] = {}
    types = params["doc_types"]
    for file_category, path in _sources(params):
        for pair in load_qa_pairs(path):
            category = pair.category or file_category
            if category is None:
                raise StageError(
                    f"{pair.where}: no category: give the row a `category`, or map the file to one "
                    "(`qa: {<category>: <file>}`)"
                )
            if category not in types:
                known = ", ".join(sorted(types))
                raise StageError(
                    f"{pair.where}: category {category!r} has no document types in `doc_types` "
                    f"(it has: {known}); add a list for it"
                )
            by_category.setdefault(category, []).append(pair)
    cap = params.get("max_pairs_per_category")
    return {category: pairs[:cap] if cap else pairs for category, pairs in by_category.items()}


def plan(pairs: Mapping[str, list[QAPair]], params: Mapping[str, Any], seed: int) -> list[Job]:
    jobs = []
    for category, mine in pairs.items():
        types = list(params["doc_types"][category])
        for p, pair in enumerate(mine):
            for d in range(params["docs_per_pair"]):
                job_id = f"{category}:{p}:{d}"
                order = random.Random(f"{seed}:{job_id}").sample(types, len(types))
                jobs.append(Job(job_id, pair, category, d, tuple(order)))
    return jobs


# ---- requests and answers -------------------------------------------------------------


@dataclass(frozen=True)
class Writing:
    """How each document is asked for and checked."""

    prompt: PromptFile
    stance: str
    min_words: int
    max_words: int
    required: tuple[str, ...]
    forbidden: tuple[str, ...]
    temperature: float
    docs_per_pair: int
    max_retries: int

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> Writing:
        patterns = params.get("patterns") or {}
        return cls(
            prompt=load_prompt(Path(params["prompt"]), SLOTS),
            stance=params["stance"],
            min_words=params["min_words"],
            max_words=params["max_words"],
            required=tuple(patterns.get("required", ())),
            forbidden=tuple(patterns.get("forbidden", ())),
            # the stage's own temperature, else the provider's, else 1.0 (varied documents)
            temperature=float(params.get("temperature", params["provider"].get("temperature", 1.0))),
            docs_per_pair=params["docs_per_pair"],
            max_retries=params["max_retries"],
        )

    def doc_type(self, job: Job, attempt: int) -> str:
        return job.types[attempt % len(job.types)]

    def request(self, job: Job, attempt: int) -> ChatRequest:
        variables = {
            "doc_type": self.doc_type(job, attempt),
            "category": job.category,
            "user": job.pair.user,
            "assistant": job.pair.assistant,
            "min_words": self.min_words,
            "max_words": self.max_words,
        }
        return ChatRequest(
            messages=({"role": "user", "content": self.prompt.fill(variables)},),
            task="qa_document",
            variables={**variables, "stance": self.stance},
            temperature=self.temperature,
            # every (document, attempt) of one pair is its own sample; more retries keep the first
            sample_index=job.index + attempt * self.docs_per_pair,
        )

    def problems(self, text: str) -> list[str]:
        return document_problems(text, self.min_words, self.max_words, self.required, self.forbidden)


def complete(
    provider: Provider, jobs: Sequence[Job], w: Writing
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Documents and failures of `jobs`, retrying each invalid one as its next doc type."""
    docs: dict[str, dict[str, Any]] = {}
    failures: dict[str, dict[str, Any]] = {}
    tried: dict[str, list[str]] = {job.id: [] for job in jobs}
    pending = list(jobs)
    for attempt in range(w.max_retries + 1):
        if not pending:
            break
        answers = provider.complete_many([w.request(job, attempt) for job in pending])
        retry = []
        for job, answer in zip(pending, answers, strict=True):
            doc_type = w.doc_type(job, attempt)
            tried[job.id].append(doc_type)
            if isinstance(answer, ProviderError):
                text, reasons = None, [f"provider error: {answer}"]
            else:
                text = answer.text.strip()
                reasons = w.problems(text)
            if reasons:
                failures[job.id] = job.row(
                    doc_types_tried=list(tried[job.id]), reasons=reasons, text=text, attempts=attempt + 1
                )
                retry.append(job)
            else:
                failures.pop(job.id, None)
                docs[job.id] = job.row(content=text, doc_type=doc_type, attempts=attempt + 1)
        pending = retry
    return list(docs.values()), list(failures.values())


# ---- the stage ----------------------------------------------------------------------


def check(params: Mapping[str, Any], spec_dir: Path) -> None:
    provider_param(params, "provider")
    if params.get("min_words", 0) > params.get("max_words", 500):
        raise ParamError(("min_words",), "min_words is larger than max_words")
    try:
        load_prompt((spec_dir / params["prompt"]).resolve(), SLOTS)
    except StageError as exc:
        raise ParamError(("prompt",), str(exc)) from None


def estimate(params: Mapping[str, Any]) -> Estimate | None:
    """`docs_per_pair` requests per QA pair, each the prompt with the pair filled in and a
    document of at most `max_words` words (about 1.3 tokens each) back; retries of invalid
    documents (at most `max_retries` each) come on top."""
    pairs = [pair for pairs in read_pairs(params).values() for pair in pairs]
    prompt = count_tokens(load_prompt(Path(params["prompt"]), SLOTS).text)
    asked = prompt + sum(count_tokens(p.user) + count_tokens(p.assistant) for p in pairs) // max(
        len(pairs), 1
    )
    calls = ChatCalls(
        params["provider"], len(pairs) * params["docs_per_pair"], asked, params["max_words"] * 13 // 10
    )
    return chat_estimate([calls], note=f"first tries; up to {params['max_retries']} retries each on top")


@stage_kind(
    metrics=metric_names,
    input_params=("qa", "prompt"),
    # chunk_size only groups requests: every document's request is the same whatever it is
    transport_params=(*transport_of("provider"), "chunk_size"),
    check=check,
    estimate=estimate,
)
def run(ctx: StageContext) -> Mapping[str, Any]:
    # the stage's seed goes with every request: a new seed, new documents
    return write_documents(ctx, make_provider(ctx.params["provider"], seed=ctx.seed, log=ctx.log))


def write_documents(ctx: StageContext, provider: Provider) -> dict[str, Any]:
    """The stage's work with a given provider (tests pass wrapped or faulty ones)."""
    started = datetime.now(timezone.utc)
    p = ctx.params
    w = Writing.of(p)
    pairs = read_pairs(p)
    jobs = plan(pairs, p, ctx.seed)
    ctx.log(f"{sum(map(len, pairs.values()))} QA pairs, stance {w.stance}")
    written = write_journalled(
        jobs, ctx.scratch_dir, p["chunk_size"], lambda c: complete(provider, c, w), ctx.log
    )
    unique, failed = written.unique, written.failed
    counts = {
        category: {
            "pairs": len(pairs[category]),
            "requested": sum(job.category == category for job in jobs),
            "docs": sum(row["category"] == category for row in unique),
            "failed": sum(row["category"] == category for row in failed),
        }
        for category in p["doc_types"]
        if category in pairs
    }
    words = [word_count(row["content"]) for row in unique]
    metrics: dict[str, Any] = {
        "n_pairs": sum(map(len, pairs.values())),
        **written.counts,
        "mean_words_per_doc": sum(words) / len(words) if words else 0.0,
        **{f"n_docs.{c}": counts.get(c, {}).get("docs", 0) for c in p["doc_types"]},
    }
    write_jsonl(ctx.out_dir / "synth_docs.jsonl", ({k: row[k] for k in OUTPUT_FIELDS} for row in unique))
    write_jsonl(ctx.out_dir / "failures.jsonl", failed)
    write_json(ctx.out_dir / "category_counts.json", counts)
    write_json(
        ctx.out_dir / "run_metadata.json",
        {
            "provider": {"name": provider.name, "model": provider.model},  # never the key
            "stance": w.stance,
            "params": p,
            "counts": {**metrics, "resumed_documents": written.resumed},
            "usage": provider.usage.to_json(),
            "started_at": started.isoformat(timespec="seconds"),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )
    written.require_some()
    return metrics
