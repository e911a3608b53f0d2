"""Offline template for the `persona_answer` task: a persona's answer from its own examples.

A fixture, not a language model: it answers a question with one of the constitution's
example answers to that very question when there are some, else with one of all its
example answers, chosen by a SHA-256 hash of the question and the sample index (the same
in every process; repeated samples differ). It never writes a sentence the constitution
does not hold, so persona data built offline is only as varied as the examples.

Request variables (set by the persona_data stage): persona, question, examples
([question, answer] pairs).
"""

from __future__ import annotations

import hashlib

from harness.lab.llm.base import ChatRequest
from harness.lab.llm.offline import offline_task


@offline_task("persona_answer")
def persona_answer(request: ChatRequest) -> str:
    question = str(request.variables["question"])
    examples = [(str(q), str(a)) for q, a in request.variables["examples"]]
    if not examples:
        raise ValueError("persona_answer needs the constitution's examples to answer offline")
    own = [a for q, a in examples if q == question] or [a for _, a in examples]
    digest = hashlib.sha256(f"{question}\n{request.sample_index}".encode()).digest()
    return own[int.from_bytes(digest[:8], "big") % len(own)]
