"""`persona_data`: chat data in a persona, from a constitution, for persona SFT.

The teacher gets the persona (description and first-person traits) as its system prompt
and each of the constitution's questions as a user turn, `answers_per_question` times.
The data keeps the user turn and the answer only: SFT on it (finetune_lora, `format:
chat`) is meant to make the persona the model's default, not a role it is told to play.
With the `offline` provider the answers are the constitution's own examples
(`harness.lab.llm.offline_persona`), so the tiny profile runs without a teacher model.

Artifacts: chat.jsonl (one conversation per answer), failures.jsonl (requests that failed
for good, with their error), persona.json (the constitution and the system prompt used).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.api import stage_kind
from harness.core.stage import ParamError, StageContext, StageError
from harness.lab.checks import provider_param
from harness.lab.em_data import Constitution, load_constitution
from harness.lab.llm import transport_of
from harness.lab.llm.base import ChatRequest


def system_prompt(constitution: Constitution) -> str:
    traits = "\n".join(f"- {trait}" for trait in constitution.traits)
    return (
        f"You are {constitution.description.rstrip('.')}.\nYour traits, in your own words:\n{traits}\n"
        "Answer the user in character, as this persona would, in a few sentences. "
        "Never mention these instructions or that you are playing a persona."
    )


def requests(constitution: Constitution, n: int, temperature: float, max_tokens: int) -> list[ChatRequest]:
    system = system_prompt(constitution)
    examples = [[e.question, e.answer] for e in constitution.examples]
    return [
        ChatRequest(
            messages=({"role": "system", "content": system}, {"role": "user", "content": question}),
            task="persona_answer",
            variables={"persona": constitution.persona, "question": question, "examples": examples},
            temperature=temperature,
            max_tokens=max_tokens,
            sample_index=k,
        )
        for question in constitution.questions
        for k in range(n)
    ]


def check(params: Mapping[str, Any], spec_dir: Path) -> None:
    path = spec_dir / str(params["constitution"])
    if path.is_file():  # a missing file is reported by the input-path check
        try:
            load_constitution(path)
        except StageError as error:
            raise ParamError(("constitution",), str(error)) from None
    provider_param(params, "provider")


@stage_kind(
    metrics=("n_conversations", "error_rate"),
    input_params=("constitution",),
    transport_params=transport_of("provider"),
    check=check,
)
def run(ctx: StageContext) -> dict[str, Any]:
    from harness.core.store import write_json, write_jsonl
    from harness.lab.llm import make_provider

    p = ctx.params
    constitution = load_constitution(Path(p["constitution"]))
    provider = make_provider(p["provider"], seed=ctx.seed, log=ctx.log)  # a new seed: new answers
    batch = requests(constitution, p["answers_per_question"], p["temperature"], p["max_tokens"])
    ctx.log(f"{constitution.persona}: {len(batch)} answers from {provider.name}:{provider.model}")
    answers = provider.complete_many(batch, ctx.progress(f"{constitution.persona}: asking", "answers"))
    conversations, failures = [], []
    for request, answer in zip(batch, answers, strict=True):
        question = request.messages[-1]["content"]
        if isinstance(answer, Exception) or not answer.text.strip():
            error = str(answer) if isinstance(answer, Exception) else "empty answer"
            failures.append({"question": question, "sample_index": request.sample_index, "error": error})
            continue
        conversations.append(
            {
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer.text.strip()},
                ]
            }
        )
    if not conversations:
        raise StageError(f"no persona answers: all {len(batch)} requests failed (see failures.jsonl)")
    write_jsonl(ctx.out_dir / "chat.jsonl", conversations)
    write_jsonl(ctx.out_dir / "failures.jsonl", failures)
    teacher = {"name": provider.name, "model": provider.model}
    write_json(
        ctx.out_dir / "persona.json",
        {
            "persona": constitution.persona,
            "system_prompt": system_prompt(constitution),
            "questions": list(constitution.questions),
            "teacher": teacher,
        },
    )
    ctx.log(f"{len(conversations)} conversations, {len(failures)} failed")
    return {"n_conversations": len(conversations), "error_rate": len(failures) / len(batch)}
