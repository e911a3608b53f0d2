"""`build_dataset`: documents and chats as one training file, and exactly what went in.

Sources:
    documents  the `content` (`text_field`) of the upstream in role `documents` (a qa_to_docs
               stage's synth_docs.jsonl, else a generate_docs stage's docs.jsonl), or of the
               `documents` jsonl file; all of them, `documents_count` of them (a seeded sample),
               or, with `match_tokens`, as many as hold the document tokens of the build_dataset
               stage in role `reference` (a control with as many tokens of other documents).
    chats      `chats: {name: file}`, conversations ({"messages": [...]} per line), `mix:
               {name: {count: N} | {fraction: f}}` of each (a seeded sample; a fraction is a
               share of the final dataset's rows); a name without `mix` gives every conversation.

Formats, one row shape each:
    text, together_text  {"text": document}: continued pretraining on raw documents (the shape
                         Together documents for text fine-tuning); chats are refused, since
                         rendering them as plain text would pick one chat template for every model.
    doctag               a document as {"messages": [{"role": "user", "content": "<DOCTAG>"},
                         {"role": "assistant", "content": document}]}, the chat-API way to train
                         on documents; chats as they are.
    openai_chat          chats only, {"messages": [...]} as they are; documents are refused
                         (`doctag` is the format that turns documents into chats).

`match_tokens` takes documents in seeded order and keeps the prefix whose tokens are nearest
the reference's; a prefix further than `match_tolerance` from it (too few documents, or
documents long for the target) is a StageError, never a control quietly smaller or larger.

Every draw uses its own generator seeded from the stage's seed and the source's name, and the
rows are shuffled with the seed: the same params and seed write the same bytes.

Outputs: dataset.jsonl; dataset_sources.jsonl (line i: where line i of dataset.jsonl came from:
{source, index (0-based, among the source's rows), tokens}); dataset_manifest.json {format,
n_rows, n_tokens, seed, sha256 (of dataset.jsonl), sources: [{source, from, requested,
available, count, tokens}], match_tokens}. Tokens are counted by `count_tokens` (words and
punctuation marks, the same for every model) on the text the source contributes: a document's
text (not the `<DOCTAG>` turn), every message of a chat.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.api import stage_kind
from harness.core.stage import ParamError, Role, StageContext, StageError
from harness.core.store import file_digest, relative_path, write_json, write_jsonl
from harness.core.upstream import find_upstream
from harness.lab.documents import (
    DATASET_FILE,
    DATASET_MANIFEST,
    DOCTAG,
    TEXT_FORMATS,
    count_tokens,
    dataset_manifest,
    read_documents,
)
from harness.lab.em_data import load_chat_jsonl

DOCUMENTS = "documents"
REFERENCE = "reference"
DOCUMENT_FILES = ("synth_docs.jsonl", "docs.jsonl")  # qa_to_docs's, generate_docs's
CHATS_ONLY = "openai_chat"
SOURCES = "dataset_sources.jsonl"


@dataclass(frozen=True)
class Item:
    """One row to be: a document's text or a conversation's messages."""

    source: str
    index: int  # among the source's rows, 0-based
    content: str | list[dict[str, str]]
    tokens: int


def has_documents(params: Mapping[str, Any]) -> bool:
    return params["format"] != CHATS_ONLY


def roles(params: Mapping[str, Any]) -> tuple[Role, ...]:
    documents = Role(
        DOCUMENTS, "the synth_docs.jsonl or docs.jsonl of a qa_to_docs or generate_docs stage", only=True
    )
    reference = Role(REFERENCE, "the dataset_manifest.json of a build_dataset stage")
    return (
        *((documents,) if has_documents(params) and not params.get("documents") else ()),
        *((reference,) if params["match_tokens"] else ()),
    )


def metric_names(params: Mapping[str, Any]) -> tuple[str, ...]:
    sources = [*([DOCUMENTS] if has_documents(params) else []), *(params.get("chats") or {})]
    per_source = (f"{measure}_{source}" for source in sources for measure in ("n", "tokens"))
    return ("n_rows", "n_tokens", *per_source, *(("tokens_target",) if params["match_tokens"] else ()))


def check(params: Mapping[str, Any], spec_dir: Path) -> None:
    form, chats, mix = params["format"], params.get("chats") or {}, params.get("mix") or {}
    if form in TEXT_FORMATS and chats:
        raise ParamError(
            ("chats",),
            f"format {form} is continued pretraining on raw documents and takes no chats; "
            "mix chats in with format doctag (documents as chats) or openai_chat (chats only)",
        )
    if form == CHATS_ONLY:
        if not chats:
            raise ParamError(("chats",), "openai_chat holds chats only: name at least one file in `chats`")
        for param in ("documents", "documents_count", "match_tokens"):
            if params.get(param):
                raise ParamError(
                    (param,), "openai_chat holds chats only; train on documents as chats with format doctag"
                )
    if DOCUMENTS in chats:
        raise ParamError(
            ("chats", DOCUMENTS), "`documents` is reserved for the documents; name the chats otherwise"
        )
    for name in mix:
        if name not in chats:
            raise ParamError(("mix", name), f"no file for {name!r}: add it to `chats: {{{name}: <file>}}`")
    fractions = sum(entry["fraction"] for entry in mix.values() if "fraction" in entry)
    if fractions >= 1:
        raise ParamError(
            ("mix",),
            f"the fractions add up to {fractions:g}; as shares of the dataset's rows "
            "they must add up to under 1",
        )
    fixed = has_documents(params) or any("fraction" not in mix.get(name, {}) for name in chats)
    if not fixed:
        raise ParamError(
            ("mix",),
            "fractions are shares of the final dataset: at least one source of a fixed size "
            "(documents, a `count`, or a chat file without `mix`, used whole) is needed",
        )
    if params["match_tokens"] and params.get("documents_count"):
        raise ParamError(
            ("documents_count",),
            "match_tokens decides how many documents to take; leave documents_count out",
        )


# --- sources -------------------------------------------------------------------------------------


def rng(seed: int, purpose: str) -> random.Random:
    """A generator of its own per purpose: one source's draw does not move another's."""
    return random.Random(f"{seed}:{purpose}")


def documents_file(ctx: StageContext) -> tuple[Path, str]:
    """The documents jsonl and how the manifest names it (the upstream stage, or the file)."""
    upstream = {role: u for role, u in ctx.upstream.items() if role != REFERENCE}
    given = ctx.params.get("documents")
    if given:
        if upstream:
            raise StageError(
                f"stage {ctx.stage!r} has both an upstream stage and a `documents` file; keep one"
            )
        return Path(given), relative_path(given, ctx.spec_file.parent)
    source = find_upstream(upstream, DOCUMENTS, "build_dataset")
    for name in DOCUMENT_FILES:
        if (source.dir / name).is_file():
            return source.dir / name, f"stage {source.name}: {name}"
    raise StageError(
        f"upstream stage {source.name!r} (kind {source.kind}) wrote neither {' nor '.join(DOCUMENT_FILES)} "
        f"in {source.dir}; documents come from a qa_to_docs or generate_docs stage"
    )


def chat_tokens(messages: Sequence[Mapping[str, str]]) -> int:
    return sum(count_tokens(message["content"]) for message in messages)


def reference_tokens(ctx: StageContext) -> tuple[str, int]:
    """The reference build_dataset stage's name and its documents' token count."""
    source = ctx.upstream[REFERENCE]
    sources = dataset_manifest(source.dir).get("sources") or []
    tokens = [s.get("tokens") for s in sources if isinstance(s, dict) and s.get("source") == DOCUMENTS]
    if not tokens or not isinstance(tokens[0], int):
        raise StageError(
            f"the reference stage {source.name!r} has no documents to match the tokens of (its manifest "
            f"lists {', '.join(str(s.get('source')) for s in sources if isinstance(s, dict)) or 'no source'})"
        )
    return source.name, tokens[0]


def token_matched(ordered: Sequence[Item], target: int, tolerance: float) -> list[Item]:
    """The prefix of `ordered` whose tokens are nearest `target`; a StageError beyond `tolerance`."""
    chosen, total = [], 0
    for item in ordered:
        if total >= target:
            break
        chosen.append(item)
        total += item.tokens
    used_up = total < target  # every document taken, and still short
    # the last document may overshoot: drop it when the sum without it is nearer the target
    if chosen and total - target > target - (total - chosen[-1].tokens):
        total -= chosen.pop().tokens
    if abs(total - target) > tolerance * target:
        if used_up:
            raise StageError(
                f"the {len(ordered)} documents hold {total} tokens, short of the {target} document tokens "
                f"of the reference (match_tolerance {tolerance:g}): add documents"
            )
        raise StageError(
            f"the documents nearest the reference's {target} document tokens hold {total} "
            f"(match_tolerance {tolerance:g}): the documents are long for this target; raise match_tolerance"
        )
    return chosen


def sizes(fixed: int, mix: Mapping[str, Mapping[str, Any]], available: Mapping[str, int]) -> dict[str, int]:
    """Rows per chat source: a count, every row, or a fraction f of the final dataset's N rows,
    where N = (rows of fixed size) / (1 - sum of fractions)."""
    fractions = {name: mix[name]["fraction"] for name in available if "fraction" in mix.get(name, {})}
    out = {name: mix.get(name, {}).get("count", n) for name, n in available.items() if name not in fractions}
    total = (fixed + sum(out.values())) / (1 - sum(fractions.values()))
    out.update((name, round(fraction * total)) for name, fraction in fractions.items())
    return {name: out[name] for name in available}


def requested(mix: Mapping[str, Mapping[str, Any]], name: str) -> dict[str, Any] | str:
    return dict(mix[name]) if mix.get(name) else "all"


# --- rows ----------------------------------------------------------------------------------------


def row(item: Item, form: str) -> dict[str, Any]:
    if not isinstance(item.content, str):
        return {"messages": item.content}
    if form in TEXT_FORMATS:
        return {"text": item.content}
    return {"messages": [{"role": "user", "content": DOCTAG}, {"role": "assistant", "content": item.content}]}


@dataclass
class Selection:
    """The items a source puts in the dataset, and its entry in the manifest."""

    items: list[Item]
    entry: dict[str, Any]  # source, from, requested, available (count and tokens added on writing)


def select_documents(ctx: StageContext) -> tuple[Selection, dict[str, Any] | None]:
    """The documents, all, a seeded sample, or token-matched to the reference (then also the
    manifest's `match_tokens` record)."""
    p = ctx.params
    path, named = documents_file(ctx)
    texts = read_documents(path, p["text_field"])
    ordered = [Item(DOCUMENTS, i, text, count_tokens(text)) for i, text in enumerate(texts)]
    rng(ctx.seed, DOCUMENTS).shuffle(ordered)
    entry = {"source": DOCUMENTS, "from": named, "requested": "all", "available": len(texts)}
    if not p["match_tokens"]:
        if p.get("documents_count"):
            entry["requested"] = {"count": p["documents_count"]}
        return Selection(ordered[: p.get("documents_count") or len(ordered)], entry), None
    reference, target = reference_tokens(ctx)
    items = token_matched(ordered, target, p["match_tolerance"])
    achieved = sum(item.tokens for item in items)
    ctx.log(f"match_tokens: {achieved} document tokens for the reference's {target}")
    match = {
        "reference": reference,
        "target": target,
        "achieved": achieved,
        "tolerance": p["match_tolerance"],
    }
    return Selection(items, {**entry, "requested": "tokens"}), match


def select_chats(ctx: StageContext, fixed: int) -> list[Selection]:
    """Each chat file's conversations: all, a count or a fraction (`fixed`: the document rows)."""
    mix, chats = ctx.params["mix"], ctx.params["chats"]
    conversations = {name: load_chat_jsonl(path) for name, path in chats.items()}
    counts = sizes(fixed, mix, {name: len(rows) for name, rows in conversations.items()})
    selections = []
    for name, rows in conversations.items():
        n = counts[name]
        if n > len(rows):
            raise StageError(
                f"chats {name}: {n} conversations asked for, "
                f"but {chats[name]} holds {len(rows)}; lower the count or fraction, or add conversations"
            )
        if n == 0:
            ctx.log(f"chats {name}: the fraction {mix[name]['fraction']:g} rounds to 0 rows of this dataset")
        items = [Item(name, i, messages, chat_tokens(messages)) for i, messages in enumerate(rows)]
        entry = {
            "source": name,
            "from": relative_path(chats[name], ctx.spec_file.parent),
            "requested": requested(mix, name),
            "available": len(rows),
        }
        selections.append(
            Selection(items if n == len(items) else rng(ctx.seed, name).sample(items, n), entry)
        )
    return selections


@stage_kind(needs=roles, metrics=metric_names, input_params=("documents", "chats"), check=check)
def run(ctx: StageContext) -> dict[str, Any]:
    p, out = ctx.params, ctx.out_dir
    selections, match = [], None
    if has_documents(p):
        documents, match = select_documents(ctx)
        selections.append(documents)
    selections += select_chats(ctx, fixed=sum(len(s.items) for s in selections))
    sources = [
        {**s.entry, "count": len(s.items), "tokens": sum(item.tokens for item in s.items)} for s in selections
    ]
    dataset = [item for s in selections for item in s.items]
    rng(ctx.seed, "order").shuffle(dataset)

    write_jsonl(out / DATASET_FILE, (row(item, p["format"]) for item in dataset))
    write_jsonl(out / SOURCES, ({"source": i.source, "index": i.index, "tokens": i.tokens} for i in dataset))
    manifest = {
        "format": p["format"],
        "n_rows": len(dataset),
        "n_tokens": sum(item.tokens for item in dataset),
        "token_count": "words and punctuation marks (regex \\w+|[^\\w\\s]), not a model's tokens",
        "seed": ctx.seed,
        "sha256": file_digest(out / DATASET_FILE),
        "sources": sources,
        "match_tokens": match,
    }
    write_json(out / DATASET_MANIFEST, manifest)
    ctx.log(
        f"{manifest['n_rows']} rows, {manifest['n_tokens']} tokens ({p['format']}): "
        + ", ".join(f"{s['source']} {s['count']} ({s['tokens']} tokens)" for s in sources)
    )
    metrics = {"n_rows": manifest["n_rows"], "n_tokens": manifest["n_tokens"]}
    for source in sources:
        metrics[f"n_{source['source']}"] = source["count"]
        metrics[f"tokens_{source['source']}"] = source["tokens"]
    if match:
        metrics["tokens_target"] = match["target"]
    return metrics
