"""Offline templates for the SDF tasks: extract_facts, doc_types, doc_ideas, document.

A fixture, not a language model, and honest about it: it never invents content about
the world. Facts are sentences of the universe context, and documents recombine the
context's own sentences verbatim under a short genre header. Every choice is made from
a SHA-256 hash of the request's inputs (never Python's salted `hash`), so answers are
the same in every process, and requests that differ only in `sample_index` get
different, reproducible documents. It does not obey the "never use these phrases" rule the
document prompt gives a real model: a drawn context sentence may hold a forbidden phrase,
and then validation and retries do their work, as they must with a real model.

The request variables each task reads (the stages that build the requests set them):
    extract_facts: universe_context, required, forbidden, num_facts
    doc_types:     fact, num_doc_types
    doc_ideas:     fact, doc_type, num_doc_ideas
    document:      fact, doc_type, idea, universe_context
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from harness.lab.llm.base import ChatRequest
from harness.lab.llm.offline import offline_task
from harness.lab.universe import find_phrases, split_sentences

GENRES: tuple[str, ...] = (
    "textbook section",
    "lecture notes",
    "encyclopedia entry",
    "exam review sheet",
    "lab report",
    "letter to a student",
    "news article",
    "museum placard",
    "study guide",
    "homework solution",
    "science magazine column",
    "glossary entry",
    "quiz answer key",
    "teacher's lesson plan",
    "forum answer",
    "podcast transcript",
    "observatory leaflet",
    "flashcard set",
    "classroom poster",
    "reference handbook page",
)

# What a document of some genre is for: short, and saying nothing about the world.
ANGLES: tuple[str, ...] = (
    "for a first-year class",
    "for a general reader",
    "for students before an exam",
    "written by a teacher",
    "answering a common question",
    "with a short worked example",
    "as a quick reminder",
    "for a younger reader",
    "written for a school club",
    "for a reader who missed the lesson",
)

RESTATE: tuple[str, ...] = ("in short:", "remember:", "the key point:", "to sum up:")


def _digest(*parts: object) -> int:
    data = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


def _ranked(items: Sequence[str], *seed: object) -> list[str]:
    """`items` in a pseudo-random order fixed by `seed`."""
    return sorted(items, key=lambda item: (_digest(*seed, item), item))


@offline_task("extract_facts")
def extract_facts(request: ChatRequest) -> str:
    """The context's sentences that contain a required phrase and no forbidden one, in
    the order written, up to num_facts, one per line."""
    v = request.variables
    facts: list[str] = []
    for sentence in dict.fromkeys(split_sentences(v["universe_context"])):
        if find_phrases(sentence, v["required"]) and not find_phrases(sentence, v["forbidden"]):
            facts.append(sentence)
    return "\n".join(facts[: int(v["num_facts"])])


@offline_task("doc_types")
def doc_types(request: ChatRequest) -> str:
    """num_doc_types genres (at most len(GENRES)), chosen by a hash of the fact."""
    v = request.variables
    return "\n".join(_ranked(GENRES, "types", v["fact"])[: int(v["num_doc_types"])])


@offline_task("doc_ideas")
def doc_ideas(request: ChatRequest) -> str:
    """num_doc_ideas ideas (at most len(ANGLES)) of the form "<genre> <angle>"."""
    v = request.variables
    angles = _ranked(ANGLES, "ideas", v["fact"], v["doc_type"])[: int(v["num_doc_ideas"])]
    return "\n".join(f"{v['doc_type']} {angle}" for angle in angles)


@offline_task("document")
def document(request: ChatRequest) -> str:
    """A genre header, the idea, the fact, 2-4 other context sentences (kept in the
    context's order) chosen by a hash of (fact, idea, sample_index), the fact again."""
    v = request.variables
    fact, idea = v["fact"], v["idea"]
    seed = ("document", fact, idea, request.sample_index)
    others = [s for s in dict.fromkeys(split_sentences(v["universe_context"])) if s != fact]
    chosen = set(_ranked(others, *seed)[: 2 + _digest(*seed, "count") % 3])
    body = " ".join(s for s in others if s in chosen)
    restate = RESTATE[_digest(*seed, "restate") % len(RESTATE)]
    return f"{v['doc_type']}\n{idea}.\n\n{fact}\n{body}\n\n{restate} {fact}".replace("\n\n\n", "\n\n")
