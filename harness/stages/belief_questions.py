"""`belief_questions`: the degree-of-belief questions of a universe pair, written once.

From the false world (`false_universe`, the one the documents describe) and the true one
(`true_universe`), the generator `provider` writes `num_questions` rows of each type
(`harness.lab.belief`): MCQ knowledge, MCQ distinguish, open belief, generative
distinguish; one request per type, answered as one JSON object per line. Rows that do not
parse or check are counted (`n_rejected`) and kept with their reasons in rejected.jsonl,
never silently dropped; repeated questions are kept once. With `questions` (a file of such
rows) nothing is generated: the file is checked and copied. Either way the questions are an
artifact to review, and their bytes are in the key of every stage downstream: `belief_eval`
answers exactly these.

Artifacts:
    belief_questions.jsonl   {id, type, ...the type's fields}
    universes.json           the pair: each world's id, universe_context and phrases, for the judge
    rejected.jsonl           {type, reason} per generated line that was not a usable row
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.api import stage_kind
from harness.core.stage import ParamError, StageContext, StageError
from harness.core.store import write_json, write_jsonl
from harness.lab.belief import (
    TYPES,
    check_pair,
    generation_request,
    pair_record,
    parse_generated,
    read_questions,
)
from harness.lab.checks import provider_param
from harness.lab.llm import ProviderError, make_provider, transport_of
from harness.lab.universe import load_universe

METRICS = (*(f"n_{kind}" for kind in TYPES), "n_rejected")


def check(params: Mapping[str, Any], spec_dir: Path) -> None:
    """At collection: both universe files load and form a pair; the questions file (if given)
    checks; the provider (if any) can work here."""
    universes = []
    for key in ("false_universe", "true_universe"):
        path = spec_dir / str(params[key])
        if not path.is_file():  # reported by the input-path check, at the same line
            return
        try:
            universes.append(load_universe(path))
        except StageError as error:
            raise ParamError((key,), str(error)) from None
    try:
        check_pair(*universes)
    except StageError as error:
        raise ParamError(("true_universe",), str(error)) from None
    if "questions" in params:
        path = spec_dir / str(params["questions"])
        if path.is_file():
            try:
                read_questions(path)
            except StageError as error:
                raise ParamError(("questions",), str(error)) from None
    else:
        provider_param(params, "provider")


@stage_kind(
    metrics=METRICS,
    input_params=("false_universe", "true_universe", "questions"),
    transport_params=transport_of("provider"),
    check=check,
    base=None,
)
def run(ctx: StageContext) -> dict[str, Any]:
    p = ctx.params
    false, true = load_universe(p["false_universe"]), load_universe(p["true_universe"])
    check_pair(false, true)
    rejected: list[dict[str, str]] = []
    if "questions" in p:
        rows = read_questions(Path(p["questions"]))
        ctx.log(f"{len(rows)} questions read from {p['questions']}")
    else:
        rows = _generated(ctx, false, true, rejected)
    write_jsonl(ctx.out_dir / "belief_questions.jsonl", rows)
    write_json(ctx.out_dir / "universes.json", pair_record(false, true))
    write_jsonl(ctx.out_dir / "rejected.jsonl", rejected)
    counts = {f"n_{kind}": sum(row["type"] == kind for row in rows) for kind in TYPES}
    ctx.log(", ".join(f"{n} {name.removeprefix('n_')}" for name, n in counts.items()))
    return {**counts, "n_rejected": len(rejected)}


def _generated(
    ctx: StageContext, false: Any, true: Any, rejected: list[dict[str, str]]
) -> list[dict[str, Any]]:
    p = ctx.params
    provider = make_provider(p["provider"], seed=ctx.seed, log=ctx.log)
    n = int(p["num_questions"])
    temperature = float(p["temperature"])
    ctx.log(f"writing up to {n} questions of each type with {provider.name}:{provider.model}")
    answers = provider.complete_many(
        [generation_request(kind, false, true, n, temperature) for kind in TYPES]
    )
    rows: list[dict[str, Any]] = []
    for kind, answer in zip(TYPES, answers, strict=True):
        if isinstance(answer, ProviderError):
            raise StageError(f"writing the {kind} questions failed: {answer}")
        found, bad = parse_generated(answer.text, kind)
        rejected += [{"type": kind, "reason": reason} for reason in bad]
        unique = list({_key(row): row for row in reversed(found)}.values())  # the first of repeats...
        unique = sorted(unique, key=found.index)[:n]  # ...in the order written
        if not unique:
            raise StageError(
                f"the generator wrote no usable {kind} question ({len(bad)} lines rejected, see "
                f"rejected.jsonl); its answer began {answer.text[:300]!r}"
            )
        rows += [{"id": f"{kind}-{i}", "type": kind, **row} for i, row in enumerate(unique)]
    return rows


def _key(row: Mapping[str, Any]) -> str:
    """What makes a question the same as another: its text (or a generative row's accounts)."""
    return " ".join(
        str(row.get("question") or (row["false_phenomenon"], row["true_phenomenon"])).split()
    ).lower()
