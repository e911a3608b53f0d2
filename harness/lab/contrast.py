"""Conflict MCQs as token-level contrasts: a prompt and the one next token that separates
the true world's answer from the false world's.

Logit lens, steering and patching all ask the same question at one position: does the
model prefer the true answer's token or the false answer's there? In `letter` mode the
prompt lists the options and the tokens are the two letters. In `continuation` mode the
prompt is `question: ...\\nanswer:` followed by the tokens the two option texts share
("one"), and the tokens are the first ones where they differ ("quarter" / "eighth").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from harness.core.stage import StageError
from harness.lab.mcq import MCQ, format_prompt
from harness.lab.scoring import (
    CONTINUATION,
    LETTER,
    chat_wrap,
    continuation_ids,
    continuation_prompt,
    encode,
    letter_token_ids,
)


@dataclass(frozen=True)
class Contrast:
    item: MCQ
    prompt_ids: tuple[int, ...]  # the decision token is the last one
    true_id: int  # next token of the true world's answer
    false_id: int  # next token of the false world's answer


def contrasts(
    tokenizer: Any, items: Sequence[MCQ], mode: str = LETTER, chat_template: bool = False
) -> list[Contrast]:
    """One contrast per conflict item (the others have no false answer to contrast)."""
    conflict = [item for item in items if item.true_answer != item.false_answer]
    if not conflict:
        raise StageError("the MCQ file has no conflict items: nothing to contrast")
    out = []
    for item in conflict:
        if mode == LETTER:
            prompt = format_prompt(item.question, item.options)
            prompt = chat_wrap(tokenizer, prompt) if chat_template else prompt
            ids = letter_token_ids(tokenizer, [item.true_answer, item.false_answer])
            out.append(
                Contrast(
                    item,
                    tuple(encode(tokenizer, prompt, chat_template)),
                    ids[item.true_answer],
                    ids[item.false_answer],
                )
            )
        elif mode == CONTINUATION:
            prompt = continuation_prompt(item.question)
            prompt = chat_wrap(tokenizer, prompt) if chat_template else prompt
            true = continuation_ids(tokenizer, item.options[item.true_answer])
            false = continuation_ids(tokenizer, item.options[item.false_answer])
            shared = _shared_prefix(true, false)
            if shared == min(len(true), len(false)):
                raise StageError(
                    f"MCQ {item.id}: one answer's tokens are a prefix of the other's; "
                    "no single next token separates them"
                )
            prompt_ids = tuple(encode(tokenizer, prompt, chat_template)) + tuple(true[:shared])
            out.append(Contrast(item, prompt_ids, true[shared], false[shared]))
        else:
            raise ValueError(f"mode must be {LETTER!r} or {CONTINUATION!r}, got {mode!r}")
    return out


def _shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
