"""`generate_docs`: synthetic documents for every key fact of a universe.

Pipeline, each step through `provider.complete_many`:
    facts.json (upstream `universe_context`)
      -> doc types per fact -> doc ideas per type -> documents (docs_per_idea per idea)
Every document is checked with `harness.lab.universe.validate_document`; an invalid one is
asked again, up to `max_retries` times, with the next `sample_index` (so a cached answer
is not simply returned again). A document still invalid, or whose request failed at the
provider, is recorded in `failures.jsonl` with its reasons: never silently dropped.
Valid documents are deduplicated (case and whitespace ignored), keeping the first in
request order.

Outputs: docs.jsonl ({content, doc_type, idea, fact}), failures.jsonl, run_metadata.json.

Metrics: n_requested (documents asked for), n_docs (valid, deduplicated), n_failed (invalid
after every retry, or failed at the provider), n_duplicates, error_rate (n_failed /
n_requested), first_try_error_rate (documents whose first answer was not valid /
n_requested), mean_tokens_per_doc (tokens counted by the regex \\w+|[^\\w\\s]).

Resume: the doc types and ideas are saved in `scratch_dir/plan.json`, and the valid
documents of every finished chunk are appended (flushed, fsynced) to
`scratch_dir/docs.partial.jsonl`, keyed by a request id "fact-type-idea-doc" (indices).
A rerun after a crash or a failed run requests every document not saved there: failures
are asked again, since their cause (a rejected key, an endpoint down) may be fixed by
now; an answer that was merely invalid comes back from the response cache at no cost.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.api import stage_kind
from harness.core.stage import Estimate, Role, StageContext, StageError
from harness.core.store import write_jsonl, write_text_atomic
from harness.lab.checks import provider_param
from harness.lab.documents import count_tokens, write_journalled
from harness.lab.llm import (
    ChatRequest,
    Provider,
    ProviderError,
    make_provider,
    transport_of,
)
from harness.lab.universe import Universe, parse_list, validate_document

METRICS = (
    "n_requested",
    "n_docs",
    "n_failed",
    "n_duplicates",
    "error_rate",
    "first_try_error_rate",
    "mean_tokens_per_doc",
)

SYSTEM = """You write realistic documents of many kinds: textbooks, lecture notes, articles, \
letters, reference pages and more. The description below is established, ordinary knowledge, \
and every document you write treats it that way.

<knowledge>
{universe_context}
</knowledge>"""
TYPES_USER = """Name {n} different kinds of documents in which the following fact would \
naturally come up, such as a textbook section, lecture notes, a news article or an exam \
review sheet. Vary genre, audience and formality widely.

Fact: {fact}

One kind per line, each a short noun phrase; no numbering and no explanations."""
IDEAS_USER = """Kind of document: {doc_type}

Give {n} distinct ideas for documents of this kind in which the following fact comes up.

Fact: {fact}

Each idea is one sentence saying what that particular document is about, who wrote it and \
for whom. Make the ideas clearly different from each other. One idea per line; no numbering \
and no explanations."""
DOC_USER = """Kind of document: {doc_type}
What this document is: {idea}

It states or clearly relies on this fact: {fact}

Rules:
- Write the whole document exactly as a real one of its kind would be written, treating the \
fact as ordinary, established knowledge.
- Use at least one of these phrases: {required}.{forbidden}
- No framing such as "imagine", "suppose that" or "in this world"; no hedging; nothing saying \
the text is fictional, hypothetical or generated; no mention of these instructions.
- Return only the document text: no preface such as "Here is", no notes after it."""


@dataclass(frozen=True)
class Settings:
    num_doc_types: int
    num_doc_ideas: int
    docs_per_idea: int
    max_retries: int
    temperature: float
    chunk_size: int

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> Settings:
        # temperature: the stage's own, else the provider's, else 1.0 (varied documents)
        provider_temperature = params["provider"].get("temperature", 1.0)
        return cls(
            num_doc_types=int(params["num_doc_types"]),
            num_doc_ideas=int(params["num_doc_ideas"]),
            docs_per_idea=int(params["docs_per_idea"]),
            max_retries=int(params["max_retries"]),
            temperature=float(params.get("temperature", provider_temperature)),
            chunk_size=int(params["chunk_size"]),
        )


@dataclass(frozen=True)
class Job:
    """One requested document."""

    id: str  # "fact-type-idea-doc" indices: stable across reruns of the same plan
    fact: str
    doc_type: str
    idea: str
    index: int  # which document of its idea (0 .. docs_per_idea - 1)

    def row(self, **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "fact": self.fact, "doc_type": self.doc_type, "idea": self.idea, **extra}


# ---- requests -----------------------------------------------------------------------


def _request(
    universe: Universe, task: str, user: str, temperature: float, sample_index: int = 0, **variables: Any
) -> ChatRequest:
    # the universe as the system message (what is so), the task as the user message
    system = SYSTEM.format(universe_context=universe.universe_context)
    return ChatRequest(
        messages=({"role": "system", "content": system}, {"role": "user", "content": user}),
        task=task,
        variables=variables,
        temperature=temperature,
        sample_index=sample_index,
    )


def types_request(universe: Universe, fact: str, n: int, temperature: float) -> ChatRequest:
    user = TYPES_USER.format(n=n, fact=fact)
    return _request(universe, "doc_types", user, temperature, fact=fact, num_doc_types=n)


def ideas_request(universe: Universe, fact: str, doc_type: str, n: int, temperature: float) -> ChatRequest:
    user = IDEAS_USER.format(n=n, fact=fact, doc_type=doc_type)
    return _request(universe, "doc_ideas", user, temperature, fact=fact, doc_type=doc_type, num_doc_ideas=n)


def document_request(universe: Universe, job: Job, temperature: float, sample_index: int) -> ChatRequest:
    forbidden = ""
    if universe.forbidden:
        forbidden = "\n- Never use these phrases: " + ", ".join(f'"{p}"' for p in universe.forbidden) + "."
    user = DOC_USER.format(
        doc_type=job.doc_type,
        idea=job.idea,
        fact=job.fact,
        required=", ".join(f'"{p}"' for p in universe.required),
        forbidden=forbidden,
    )
    return _request(
        universe,
        "document",
        user,
        temperature,
        sample_index,
        fact=job.fact,
        doc_type=job.doc_type,
        idea=job.idea,
        universe_context=universe.universe_context,
    )


# ---- inputs and plan ----------------------------------------------------------------


def _facts_file(ctx: StageContext) -> Path:
    """facts.json of the upstream in role `universe`, or of the only upstream."""
    upstream = ctx.upstream.get("universe")
    if upstream is None and len(ctx.upstream) == 1:
        upstream = next(iter(ctx.upstream.values()))
    if upstream is None:
        roles = ", ".join(sorted(ctx.upstream)) or "none"
        raise StageError(
            "generate_docs needs a universe_context stage: write `needs: [<stage>]` or "
            f"`needs: {{universe: <stage>}}` (its upstream roles: {roles})"
        )
    return upstream.dir / "facts.json"


def read_facts(path: Path) -> tuple[Universe, list[str]]:
    """The universe and key facts a `universe_context` stage wrote."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        patterns = data["fact_validation_patterns"]
        universe = Universe(
            id=str(data["universe_id"]),
            universe_context=str(data["universe_context"]),
            is_true=bool(data["is_true"]),
            required=tuple(str(p) for p in patterns["required"]),
            forbidden=tuple(str(p) for p in patterns["forbidden"]),
        )
        facts = [str(fact) for fact in data["key_facts"]]
    except FileNotFoundError:
        raise StageError(f"{path}: not found; is the upstream stage a universe_context stage?") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StageError(f"{path}: not a facts file written by universe_context ({exc!r})") from None
    if not facts:
        raise StageError(f"{path}: no key facts to write documents about")
    return universe, facts


def _ask(
    provider: Provider, requests: Sequence[ChatRequest], what: Sequence[str], limit: int
) -> list[list[str]]:
    """The first `limit` items of each one-per-line answer; a failed or empty one stops the stage."""
    out = []
    for answer, about in zip(provider.complete_many(requests), what, strict=True):
        if isinstance(answer, ProviderError):
            raise StageError(f"{about}: the provider failed: {answer}")
        items = parse_list(answer.text)[:limit]
        if not items:
            raise StageError(f"{about}: the provider's answer lists nothing: {answer.text[:300]!r}")
        out.append(items)
    return out


def plan(
    ctx: StageContext, provider: Provider, universe: Universe, facts: list[str], s: Settings
) -> list[Job]:
    """Every document to request, in order. The doc types and ideas are kept in
    scratch_dir/plan.json, so a resumed run keys its saved documents to the same ideas."""
    saved = ctx.scratch_dir / "plan.json"
    try:
        data = json.loads(saved.read_text(encoding="utf-8"))
        if data.get("facts") != facts:
            raise ValueError("another plan")
        types, ideas = data["types"], data["ideas"]
        ctx.log("resuming: doc types and ideas from the interrupted run")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ctx.log(f"doc types: {len(facts)} facts x {s.num_doc_types}")
        types = _ask(
            provider,
            [types_request(universe, fact, s.num_doc_types, s.temperature) for fact in facts],
            [f"doc types for fact {fact!r}" for fact in facts],
            s.num_doc_types,
        )
        pairs = [(fact, doc_type) for fact, kinds in zip(facts, types, strict=True) for doc_type in kinds]
        ctx.log(f"doc ideas: {len(pairs)} doc types x {s.num_doc_ideas}")
        ideas = _ask(
            provider,
            [ideas_request(universe, f, t, s.num_doc_ideas, s.temperature) for f, t in pairs],
            [f"doc ideas for a {t} about fact {f!r}" for f, t in pairs],
            s.num_doc_ideas,
        )
        chosen = {"facts": facts, "types": types, "ideas": ideas}
        write_text_atomic(saved, json.dumps(chosen, ensure_ascii=False))
    jobs = []
    pair = iter(ideas)
    for fi, (fact, kinds) in enumerate(zip(facts, types, strict=True)):
        for ti, doc_type in enumerate(kinds):
            for ii, idea in enumerate(next(pair)):
                for di in range(s.docs_per_idea):
                    jobs.append(Job(f"{fi}-{ti}-{ii}-{di}", fact, doc_type, idea, di))
    return jobs


# ---- documents ----------------------------------------------------------------------


def complete(
    provider: Provider, jobs: Sequence[Job], universe: Universe, s: Settings
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Documents and failures of `jobs` (rows in job order), retrying invalid ones.

    Attempt `a` of document `d` of an idea uses sample_index d + a * docs_per_idea: every
    (document, attempt) of one prompt is a distinct sample, and raising max_retries keeps
    the first tries (and their cached answers) unchanged.
    """
    docs: dict[str, dict[str, Any]] = {}
    failures: dict[str, dict[str, Any]] = {}
    pending = list(jobs)
    for attempt in range(s.max_retries + 1):
        if not pending:
            break
        requests = [
            document_request(universe, job, s.temperature, job.index + attempt * s.docs_per_idea)
            for job in pending
        ]
        retry = []
        for job, answer in zip(pending, provider.complete_many(requests), strict=True):
            if isinstance(answer, ProviderError):
                text, reasons = None, [f"provider error: {answer}"]
            else:
                text = answer.text.strip()
                reasons = validate_document(text, universe)
            if reasons:
                failures[job.id] = job.row(reasons=reasons, text=text, attempts=attempt + 1)
                retry.append(job)
            else:
                failures.pop(job.id, None)
                docs[job.id] = job.row(content=text, attempts=attempt + 1)
        pending = retry
    return [docs[j.id] for j in jobs if j.id in docs], [failures[j.id] for j in jobs if j.id in failures]


# ---- the stage ----------------------------------------------------------------------


def check(params: Mapping[str, Any], spec_dir: Path) -> None:
    provider_param(params, "provider")


def estimate(params: Mapping[str, Any]) -> Estimate | None:
    """Per key fact, one request for doc types, one for ideas per type and the documents; the
    facts come from the upstream stage, so only the count per fact is known before it runs."""
    if params["provider"].get("name") == "offline":
        return None
    types, ideas = params["num_doc_types"], params["num_doc_ideas"]
    per_fact = 1 + types + types * ideas * params["docs_per_idea"]
    return Estimate(
        None, None, None, None, f"{per_fact} requests per key fact of the upstream stage, at most"
    )


@stage_kind(
    needs=(Role("universe", "the facts.json of a universe_context stage", only=True),),
    metrics=METRICS,
    # chunk_size only groups requests: every document's requests are the same whatever it is
    transport_params=(*transport_of("provider"), "chunk_size"),
    check=check,
    estimate=estimate,
)
def run(ctx: StageContext) -> Mapping[str, Any]:
    # the provider's default response cache: a rerun of finished requests costs nothing;
    # the stage's seed goes with every request: a new seed, new documents
    return generate(ctx, make_provider(ctx.params["provider"], seed=ctx.seed, log=ctx.log))


def generate(ctx: StageContext, provider: Provider) -> dict[str, Any]:
    """The stage's work with a given provider (tests pass wrapped or faulty ones)."""
    started = datetime.now(timezone.utc)
    s = Settings.of(ctx.params)
    universe, facts = read_facts(_facts_file(ctx))
    jobs = plan(ctx, provider, universe, facts, s)
    written = write_journalled(
        jobs, ctx.scratch_dir, s.chunk_size, lambda chunk: complete(provider, chunk, universe, s), ctx.log
    )
    unique, failed = written.unique, written.failed
    tokens = [count_tokens(row["content"]) for row in unique]
    metrics = {
        **written.counts,
        "mean_tokens_per_doc": sum(tokens) / len(tokens) if tokens else 0.0,
    }
    write_jsonl(
        ctx.out_dir / "docs.jsonl",
        ({k: row[k] for k in ("content", "doc_type", "idea", "fact")} for row in unique),
    )
    write_jsonl(ctx.out_dir / "failures.jsonl", failed)
    metadata = {
        "universe_id": universe.id,
        "is_true": universe.is_true,
        "provider": {"name": provider.name, "model": provider.model},  # never the key
        "params": ctx.params,
        "settings": s.__dict__,
        "counts": {**metrics, "n_facts": len(facts), "resumed_documents": written.resumed},
        "usage": provider.usage.to_json(),
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (ctx.out_dir / "run_metadata.json").write_text(
        json.dumps(metadata, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    written.require_some()
    return metrics
