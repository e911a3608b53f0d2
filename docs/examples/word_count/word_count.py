"""`word_count`: how many words a text file has, and what share of them another
word_count stage's text has too. A complete stage kind, small enough to read at once
(docs/writing-a-stage-kind.md walks through it).

Artifacts in the stage directory:
    counts.json   {word: count}, the words of at least `min_length` letters
    top.jsonl     the `top` most frequent words, one {"word", "count"} per line
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.api import (
    ParamError,
    Role,
    StageContext,
    StageError,
    find_upstream,
    stage_kind,
    write_json,
    write_jsonl,
)

WORD = re.compile(r"[^\W\d_]+")
REFERENCE = Role("reference", "the counts.json of another word_count stage")


def check(params: Mapping[str, Any], spec_dir: Path) -> None:
    """At collection, in seconds: a mistake found here is shown at its line of the spec."""
    if params["top"] > 1000:
        raise ParamError(("top",), "top is at most 1000: a longer list is no summary")


@stage_kind(
    # the names gates may use; `shared` only when there is a reference to share with
    metrics=lambda params: ("n_words", "n_distinct", *(("shared",) if params["compare"] else ())),
    needs=lambda params: (REFERENCE,) if params["compare"] else (),
    input_params=("text",),  # checked at collection, hashed into the cache key
    check=check,
)
def run(ctx: StageContext) -> dict[str, Any]:
    p = ctx.params  # the schema's defaults are filled; `text` is an absolute path
    lines = Path(p["text"]).read_text(encoding="utf-8").splitlines()
    counts: Counter[str] = Counter()
    for line in ctx.track(lines, "counting", "lines"):  # a line of progress every few seconds
        counts.update(w for w in WORD.findall(line.lower()) if len(w) >= p["min_length"])
    if not counts:
        raise StageError(f"{p['text']}: no word of {p['min_length']} or more letters")

    write_json(ctx.out_dir / "counts.json", dict(counts))
    write_jsonl(ctx.out_dir / "top.jsonl", ({"word": w, "count": n} for w, n in counts.most_common(p["top"])))
    metrics: dict[str, Any] = {"n_words": sum(counts.values()), "n_distinct": len(counts)}
    if p["compare"]:
        reference = find_upstream(ctx.upstream, REFERENCE.name, "word_count")
        theirs = json.loads((reference.dir / "counts.json").read_text(encoding="utf-8"))
        metrics["shared"] = len(counts.keys() & theirs.keys()) / len(counts)
    return metrics
