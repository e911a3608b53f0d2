"""Offline templates for degree-of-belief questions and their judge: rule-based fixtures.

Fixtures, not language models: they read the universe pair's own sentences and phrases, so
that `belief_questions` and `belief_eval` run end to end offline (the tiny profile), and
they understand nothing beyond the rules below. Real measurements need real ones.

`belief_questions` (variables: type, n, false_context, true_context, false_phrases,
true_phrases: each world's `fact_validation_patterns.required`). The contrasts of the pair:
each sentence of the false world (`harness.lab.universe.split_sentences`) with the
true-world sentence sharing its longest word prefix, when that prefix has at least
`MIN_STEM_WORDS` words and the rests differ. The stem is the false sentence cut right
before the words where the two worlds differ, the cut moved back to the start of a world's
phrase it would split (`one eighth as strong` against `one quarter as strong` is cut
before `one`, so the tail holds the whole phrase the judge looks for); each world's tail
is the rest of its sentence (final punctuation stripped). Stems are kept once, in the false world's order; at
most `n` rows per type:
  - mcq_knowledge: the stem, up to four options: both tails and up to two distractors,
    other tails of the pair ending in the same word (`one ninth as strong`), so that every
    option answers the stem (a contrast with no such tail has two), shuffled by the row's
    number;
  - mcq_distinguish: the stem, the two tails;
  - open_belief: the stem alone, for a model to continue (`when the distance between two
    planets doubles, the gravity between them becomes`);
  - generative_distinguish: one row, the first two sentences of each world.

`belief_judge` (variables: answer, false_phrases, true_phrases: each world's
`fact_validation_patterns.required`). Phrases match as `harness.lab.universe.find_phrases`
does (case-insensitive substrings). An answer holding a phrase of one world only is that
world's (`verdict: A` false, `verdict: B` true); one holding phrases of both, or of
neither, is `verdict: AMBIGUOUS`. No negation, no context: "not one eighth" is still the
false world.
"""

from __future__ import annotations

import json
import random

from harness.lab.belief import DISTINGUISH, GENERATIVE, KNOWLEDGE, OPEN
from harness.lab.llm.base import ChatRequest
from harness.lab.llm.offline import offline_task
from harness.lab.mcq import LETTERS
from harness.lab.universe import find_phrases, split_sentences

MIN_STEM_WORDS = 2
N_OPTIONS = 4


def _unsplit(words: list[str], cut: int, phrases: list[str]) -> int:
    """`cut` (a number of words) moved back to the start of a phrase it falls inside."""
    text = " ".join(words).casefold()
    at = len(" ".join(words[:cut]))
    for phrase in phrases:
        start = text.find(phrase.casefold())
        while start != -1:
            if start < at < start + len(phrase):
                cut = min(cut, len(text[:start].split()) - (0 if start == 0 or text[start - 1] == " " else 1))
            start = text.find(phrase.casefold(), start + 1)
    return cut


def contrasts(
    false_context: str, true_context: str, false_phrases: list[str], true_phrases: list[str]
) -> list[tuple[str, str, str]]:
    """(stem, false tail, true tail) per contrast of the pair (see the module docstring)."""
    true_sentences = [s.split() for s in split_sentences(true_context)]
    found: dict[str, tuple[str, str]] = {}
    for sentence in split_sentences(false_context):
        words = sentence.split()
        best, match = 0, None
        for other in true_sentences:
            shared = next(
                (i for i, (a, b) in enumerate(zip(words, other, strict=False)) if a != b),
                min(len(words), len(other)),
            )
            if shared > best:
                best, match = shared, other
        if match is None:
            continue
        best = min(_unsplit(words, best, false_phrases), _unsplit(match, best, true_phrases))
        if best < MIN_STEM_WORDS:
            continue
        false_tail, true_tail = (" ".join(w[best:]).rstrip(".!?") for w in (words, match))
        if false_tail and true_tail and false_tail != true_tail:
            found.setdefault(" ".join(words[:best]), (false_tail, true_tail))
    return [(stem, f, t) for stem, (f, t) in found.items()]


def _options(number: int, false_tail: str, true_tail: str, tails: list[str]) -> list[str]:
    last = false_tail.split()[-1]
    others = [t for t in tails if t not in (false_tail, true_tail) and t.split()[-1] == last]
    others = others[number % len(others) :] + others[: number % len(others)] if others else []
    options = [false_tail, true_tail, *others[: N_OPTIONS - 2]]
    random.Random(number).shuffle(options)
    return options


def rows(kind: str, n: int, false_context: str, true_context: str, phrases: tuple[list[str], list[str]]):
    """The rows of type `kind` the template writes (see the module docstring); `phrases`:
    the false world's and the true world's."""
    if kind == GENERATIVE:
        first_two = [" ".join(split_sentences(c)[:2]) for c in (false_context, true_context)]
        return [{"false_phenomenon": first_two[0], "true_phenomenon": first_two[1]}]
    every = contrasts(false_context, true_context, *phrases)
    pairs = every[:n]
    if kind == OPEN:
        return [{"question": stem} for stem, _, _ in pairs]
    if kind == DISTINGUISH:
        return [{"question": stem, "false_option": f, "true_option": t} for stem, f, t in pairs]
    if kind == KNOWLEDGE:
        tails = list(dict.fromkeys(tail for _, f, t in every for tail in (f, t)))
        out = []
        for number, (stem, f, t) in enumerate(pairs):
            options = dict(zip(LETTERS, _options(number, f, t, tails), strict=False))
            letter = {text: key for key, text in options.items()}
            out.append(
                {"question": stem, "options": options, "false_answer": letter[f], "true_answer": letter[t]}
            )
        return out
    raise ValueError(f"the offline belief_questions template writes no {kind!r} rows")


@offline_task("belief_questions")
def belief_questions(request: ChatRequest) -> str:
    v = request.variables
    phrases = (list(v["false_phrases"]), list(v["true_phrases"]))
    found = rows(v["type"], int(v["n"]), v["false_context"], v["true_context"], phrases)
    return "\n".join(json.dumps(row, ensure_ascii=False) for row in found)


@offline_task("belief_judge")
def belief_judge(request: ChatRequest) -> str:
    v = request.variables
    answer = str(v["answer"])
    in_false = bool(find_phrases(answer, list(v["false_phrases"])))
    in_true = bool(find_phrases(answer, list(v["true_phrases"])))
    verdict = "A" if in_false and not in_true else "B" if in_true and not in_false else "AMBIGUOUS"
    return f"verdict: {verdict}"
