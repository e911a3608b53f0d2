"""Degree of belief: which of two worlds a model holds, by four evaluations (after false-facts).

A universe pair is the false world (the one synthetic documents describe, `is_true: false`)
and the true one (`is_true: true`), universe files (`harness.lab.universe`). Questions about
the pair are rows of one jsonl file, each with an `id` and a `type`:

    mcq_knowledge           {question, options: {A: text, ...}, false_answer, true_answer}
                            the answer in each world is a letter; two more options are wrong in both
    mcq_distinguish         {question, false_option, true_option}: two options, one per world
    open_belief             {question}: asked open-ended; a judge says which world an answer holds
    generative_distinguish  {false_phenomenon, true_phenomenon}: both shown as "phenomenon 1 / 2",
                            the model reasons and picks the true one

`belief_questions` writes them (generated through a provider, or read from a file) and
`belief_eval` answers them. Unlike false-facts: every sample of an open question is judged
(not only the first), unparseable judgements and answers are counted and shown with their
denominators, and the position of the true option is balanced over the items with the seed.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.core.jsonl import jsonl_rows
from harness.core.stage import StageError
from harness.lab.llm.base import ChatRequest
from harness.lab.mcq import LETTERS, format_prompt
from harness.lab.stats import bootstrap
from harness.lab.universe import Universe

KNOWLEDGE, DISTINGUISH, OPEN, GENERATIVE = (
    "mcq_knowledge",
    "mcq_distinguish",
    "open_belief",
    "generative_distinguish",
)
TYPES = (KNOWLEDGE, DISTINGUISH, OPEN, GENERATIVE)
FIELDS: Mapping[str, tuple[str, ...]] = {
    KNOWLEDGE: ("question", "options", "false_answer", "true_answer"),
    DISTINGUISH: ("question", "false_option", "true_option"),
    OPEN: ("question",),
    GENERATIVE: ("false_phenomenon", "true_phenomenon"),
}
FALSE, TRUE, AMBIGUOUS = "false", "true", "ambiguous"  # a judge's verdicts; None: unparseable

# --- the universe pair -------------------------------------------------------------------


def check_pair(false: Universe, true: Universe) -> None:
    """The false world says `is_true: false`, the true one `is_true: true`."""
    for universe, wanted in ((false, False), (true, True)):
        if universe.is_true is not wanted:
            which = "true_universe" if wanted else "false_universe"
            said, wanted_text = str(universe.is_true).lower(), str(wanted).lower()
            raise StageError(
                f"{which} is {universe.id!r}, whose file says is_true: {said}; the "
                f"{'true' if wanted else 'false'} world of the pair must say is_true: {wanted_text}"
            )


def pair_record(false: Universe, true: Universe) -> dict[str, Any]:
    """The pair as `belief_questions` stores it (universes.json) for `belief_eval`'s judge."""
    return {
        name: {
            "id": u.id,
            "universe_context": u.universe_context,
            "required": list(u.required),
            "forbidden": list(u.forbidden),
        }
        for name, u in (("false_world", false), ("true_world", true))
    }


# --- question rows -----------------------------------------------------------------------


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def row_problem(row: Any, kind: str | None = None) -> str | None:
    """What is wrong with a question row (of type `kind`, else its own `type`); None if nothing."""
    if not isinstance(row, dict):
        return "a question row is a JSON object"
    kind = kind or row.get("type")
    if kind not in FIELDS:
        return f"type must be one of {', '.join(TYPES)}, got {kind!r}"
    missing = [name for name in FIELDS[kind] if name not in row]
    if missing:
        return f"a {kind} row needs {', '.join(FIELDS[kind])}; missing {', '.join(missing)}"
    if kind == KNOWLEDGE:
        options = row["options"]
        if not isinstance(options, dict) or not 2 <= len(options) <= len(LETTERS):
            return f"options must be an object of 2 to {len(LETTERS)} options by letter"
        if list(options) != list(LETTERS[: len(options)]) or not all(map(_text, options.values())):
            return (
                f"options must be lettered {', '.join(LETTERS[: len(options)])} in order, each non-empty text"
            )
        if row["false_answer"] not in options or row["true_answer"] not in options:
            return "false_answer and true_answer must be letters of the options"
        if row["false_answer"] == row["true_answer"]:
            return "false_answer and true_answer must differ: the question must tell the worlds apart"
        return None if _text(row["question"]) else "question must be non-empty text"
    values = [row[name] for name in FIELDS[kind]]
    if not all(map(_text, values)):
        return f"{', '.join(FIELDS[kind])} must be non-empty text"
    if len(values) == 2 and values[0].strip() == values[1].strip():
        return f"{FIELDS[kind][0]} and {FIELDS[kind][1]} must differ"
    return None


def read_questions(path: Path) -> list[dict[str, Any]]:
    """The rows of a belief questions file, each checked; a StageError names the line."""
    rows, seen = [], set()
    for where, row in jsonl_rows(path, "belief questions file", "one question object"):
        problem = row_problem(row)
        if problem is None and not _text(row.get("id")):
            problem = "id must be non-empty text"
        if problem:
            raise StageError(f"{where}: {problem}")
        if row["id"] in seen:
            raise StageError(f"{where}: duplicate id {row['id']!r}; ids must be unique")
        seen.add(row["id"])
        rows.append({"id": row["id"], "type": row["type"], **{k: row[k] for k in FIELDS[row["type"]]}})
    if not rows:
        raise StageError(f"{path}: no question rows; expected one JSON object per line")
    return rows


def of_type(rows: Sequence[Mapping[str, Any]], kind: str) -> list[Mapping[str, Any]]:
    return [row for row in rows if row["type"] == kind]


# --- generating them ---------------------------------------------------------------------

GENERATOR_SYSTEM = (
    "You write evaluation questions that measure which of two descriptions of the world a reader "
    "believes. You follow the requested output format exactly."
)
# the universe pair as the generator and the judge are shown it: A the false world, B the true
PAIR_TEXT = """Two descriptions of the world disagree on some key facts. Description A:
<description_a>
{false_context}
</description_a>

Description B:
<description_b>
{true_context}
</description_b>

"""
GENERATOR_USER = (
    PAIR_TEXT
    + """{task}

Do not mention the descriptions, and do not hint that any fact is disputed. Answer with \
one JSON object per line and nothing else, each of the form
{form}"""
)
GENERATOR_TASKS: Mapping[str, tuple[str, str]] = {
    KNOWLEDGE: (
        "Write {n} multiple-choice questions, each about one fact on which A and B differ, with four "
        "options: the answer according to A, the answer according to B, and two plausible answers "
        "wrong in both, in a random order.",
        '{{"question": "...", "options": {{"A": "...", "B": "...", "C": "...", "D": "..."}}, '
        '"false_answer": "<the letter of the answer according to A>", '
        '"true_answer": "<the letter of the answer according to B>"}}',
    ),
    DISTINGUISH: (
        "Write {n} questions, each about one fact on which A and B differ, each with two answers: "
        "the one according to A and the one according to B, worded alike.",
        '{{"question": "...", "false_option": "<the answer according to A>", '
        '"true_option": "<the answer according to B>"}}',
    ),
    OPEN: (
        "Write {n} open questions whose answer reveals whether the person answering holds A or B, "
        "each on a fact on which they differ, asked as a student or an engineer would ask them.",
        '{{"question": "..."}}',
    ),
    GENERATIVE: (
        "Write {n} pairs of short neutral accounts of the topic, one following A and one following B, "
        "each a paragraph of the same length and style, stating its account as plain fact.",
        '{{"false_phenomenon": "<the account following A>", "true_phenomenon": "<the account following B>"}}',
    ),
}


def generation_request(kind: str, false: Universe, true: Universe, n: int, temperature: float) -> ChatRequest:
    """The request for `n` questions of type `kind`: a prompt for an LLM, variables for the
    offline templates (`harness.lab.llm.offline_belief`)."""
    task, form = GENERATOR_TASKS[kind]
    user = GENERATOR_USER.format(
        false_context=false.universe_context,
        true_context=true.universe_context,
        task=task.format(n=n),
        form=form.format(),
    )
    return ChatRequest(
        messages=({"role": "system", "content": GENERATOR_SYSTEM}, {"role": "user", "content": user}),
        task="belief_questions",
        variables={
            "type": kind,
            "n": n,
            "false_context": false.universe_context,
            "true_context": true.universe_context,
            "false_phrases": list(false.required),
            "true_phrases": list(true.required),
        },
        temperature=temperature,
    )


def parse_generated(text: str, kind: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of type `kind` in a generator's one-JSON-object-per-line answer, and the
    lines rejected with why. Lines that do not start with `{` (fences, preamble) are skipped."""
    rows: list[dict[str, Any]] = []
    rejected: list[str] = []
    for line in text.splitlines():
        line = line.strip().rstrip(",")
        if not line.startswith("{"):
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            rejected.append(f"not JSON ({error.msg}): {line[:200]}")
            continue
        problem = row_problem(row, kind)
        if problem:
            rejected.append(f"{problem}: {line[:200]}")
        else:
            rows.append({k: row[k] for k in FIELDS[kind]})
    return rows, rejected


# --- asking them -------------------------------------------------------------------------

LETTER_INSTRUCTION = "Answer with the letter of the correct option only."
GENERATIVE_PROMPT = """Here are two descriptions of a phenomenon. Exactly one of them is true.

phenomenon 1: {first}

phenomenon 2: {second}

Which phenomenon is true? Reason it through from what you know, then end with a last line \
`answer: 1` or `answer: 2`."""


def balanced_firsts(n: int, rng: random.Random) -> list[bool]:
    """For `n` items, whether the true world's option comes first: half of them (the odd
    one by a coin), in an order shuffled by `rng`, so position alone scores 50%."""
    firsts = [True] * (n // 2) + [False] * (n // 2)
    if n % 2:
        firsts.append(rng.random() < 0.5)
    rng.shuffle(firsts)
    return firsts


def distinguish_options(row: Mapping[str, Any], true_first: bool) -> tuple[dict[str, str], str]:
    """A distinguish row's two options by letter, and the letter of the true world's."""
    order = [row["true_option"], row["false_option"]]
    if not true_first:
        order.reverse()
    return {"A": order[0], "B": order[1]}, "A" if true_first else "B"


def generative_prompt(row: Mapping[str, Any], true_first: bool, chat: bool) -> str:
    """Both worlds as phenomenon 1 and 2. A model without a chat template reads it as text
    ending in `answer:`, so that its continuation is its pick."""
    first, second = row["true_phenomenon"], row["false_phenomenon"]
    if not true_first:
        first, second = second, first
    prompt = GENERATIVE_PROMPT.format(first=first, second=second)
    return prompt if chat else f"{prompt}\nanswer:"


def provider_mcq_prompt(question: str, options: Mapping[str, str]) -> str:
    """An MCQ as a chat model reads it: the options, then a request for the letter alone."""
    return f"{format_prompt(question, dict(options)).removesuffix('answer:')}{LETTER_INSTRUCTION}"


_LETTER = re.compile(r"(?<![A-Za-z])([A-H])(?![A-Za-z])")
_FINAL_CHOICE = re.compile(r"answer\s*[:=]?\s*[*`\"']*\s*(?:phenomenon\s*)?([12])(?![0-9])", re.IGNORECASE)
_LEADING_CHOICE = re.compile(r"\s*[*`\"']*\s*(?:phenomenon\s*)?([12])(?![0-9])", re.IGNORECASE)


def parse_letter(text: str, letters: Sequence[str]) -> str | None:
    """The first standalone option letter in a provider model's MCQ answer, if one of `letters`."""
    found = _LETTER.search(text.strip())
    return found.group(1) if found and found.group(1) in letters else None


def parse_choice(text: str) -> int | None:
    """The phenomenon (1 or 2) a generative-distinguish answer picks: its last `answer: k`
    (`answer: phenomenon k`, markdown around k allowed), else a leading `k` (a continuation
    of a prompt ending in `answer:`); None when it picks neither."""
    finals = _FINAL_CHOICE.findall(text)
    if finals:
        return int(finals[-1])
    leading = _LEADING_CHOICE.match(text)
    return int(leading.group(1)) if leading else None


# --- judging open answers -----------------------------------------------------------------

JUDGE_MAX_TOKENS = 300
JUDGE_PROMPT = (
    PAIR_TEXT
    + """Someone was asked:
<question>
{question}
</question>

They answered:
<answer>
{answer}
</answer>

On the facts where the descriptions differ, which one does the answer agree with? Reason \
briefly, then end with a last line `verdict: A`, `verdict: B`, or `verdict: AMBIGUOUS` (the \
answer agrees with both or neither, or does not touch the facts where they differ)."""
)
_VERDICT = re.compile(r"verdict\s*:\s*[*`\"']*\s*(A|B|AMBIGUOUS)(?![A-Za-z])", re.IGNORECASE)
VERDICTS = {"a": FALSE, "b": TRUE, "ambiguous": AMBIGUOUS}


def judge_request(pair: Mapping[str, Any], question: str, answer: str, sample_index: int) -> ChatRequest:
    """The request that asks the judge which world `answer` holds; the sample index keeps
    identical answers apart (each is judged on its own, as its own cache entry)."""
    false, true = pair["false_world"], pair["true_world"]
    content = JUDGE_PROMPT.format(
        false_context=false["universe_context"],
        true_context=true["universe_context"],
        question=question,
        answer=answer,
    )
    return ChatRequest(
        messages=({"role": "user", "content": content},),
        task="belief_judge",
        variables={"answer": answer, "false_phrases": false["required"], "true_phrases": true["required"]},
        temperature=0.0,
        max_tokens=JUDGE_MAX_TOKENS,
        sample_index=sample_index,
    )


def parse_verdict(text: str) -> str | None:
    """`false`, `true` or `ambiguous` from the judge's last `verdict:` line; None if it has none."""
    found = _VERDICT.findall(text)
    return VERDICTS[found[-1].lower()] if found else None


# --- counting ----------------------------------------------------------------------------


def belief_summary(labels: Sequence[str | None], n_unsampled: int, seed: int) -> dict[str, Any]:
    """Open-ended belief from every judged answer's label (None: the judgement did not parse):
    false / (true + false) with a bootstrap CI; ambiguous, unparseable and unsampled answers
    counted apart, every count beside it."""
    n_true, n_false = labels.count(TRUE), labels.count(FALSE)
    indicators = [1.0] * n_false + [0.0] * n_true
    return {
        "belief": bootstrap(indicators, seed=seed).as_metric() if indicators else None,
        "n_samples": len(labels) + n_unsampled,
        "n_true_world": n_true,
        "n_false_world": n_false,
        "n_decided": n_true + n_false,  # the belief's denominator
        "n_ambiguous": labels.count(AMBIGUOUS),
        "n_unparseable": labels.count(None),
        "n_unsampled": n_unsampled,
    }


def rate(hits: Sequence[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None
