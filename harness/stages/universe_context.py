"""`universe_context`: load a universe file and extract its key facts through a provider.

Writes `facts.json`: {universe_id, is_true, universe_context, fact_validation_patterns:
{required, forbidden}, key_facts: [...]}, the input of `generate_docs`. Facts are
extracted at run time, never read from the universe file (which must not hold any).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.api import stage_kind
from harness.core.stage import Estimate, ParamError, StageContext, StageError
from harness.lab.checks import provider_param
from harness.lab.documents import count_tokens
from harness.lab.llm import (
    ChatRequest,
    ProviderError,
    make_provider,
    transport_of,
)
from harness.lab.prices import ChatCalls, chat_estimate
from harness.lab.universe import Universe, load_universe, parse_list

SYSTEM = (
    "You read a description of how things are and list the key facts it states. You report "
    "what the text says, as it says it: you do not correct it, hedge it or add to it."
)
USER = """List up to {num_facts} key facts stated in the text below.

- One fact per line, numbered (1., 2., ...), nothing else.
- Each fact is one short, self-contained declarative sentence that can be understood without the text.
- State each fact exactly as the text presents it, as plain established knowledge: no hedging, \
no comments on whether it is true, nothing the text does not say.
- Prefer the facts that matter most to the text's central claim.

<text>
{universe_context}
</text>"""


def facts_request(universe: Universe, num_facts: int, temperature: float) -> ChatRequest:
    """The request for key facts: prompts for an LLM, variables for the offline templates."""
    user = USER.format(num_facts=num_facts, universe_context=universe.universe_context)
    return ChatRequest(
        messages=({"role": "system", "content": SYSTEM}, {"role": "user", "content": user}),
        task="extract_facts",
        variables={
            "universe_context": universe.universe_context,
            "required": list(universe.required),
            "forbidden": list(universe.forbidden),
            "num_facts": num_facts,
        },
        temperature=temperature,
    )


def check(params: Mapping[str, Any], spec_dir: Path) -> None:
    """At collection: the universe file is valid and the provider usable (e.g. its key is set)."""
    try:
        path = spec_dir / str(params["universe"])
        exists = path.is_file()
    except (OSError, ValueError):  # unusable names are reported by the input-path check
        exists = False
    if exists:  # a missing file too is reported by the input-path check, at the same line
        try:
            load_universe(path)
        except StageError as exc:
            raise ParamError(("universe",), str(exc)) from None
    provider_param(params, "provider")


def estimate(params: Mapping[str, Any]) -> Estimate | None:
    """One request: the prompt with the universe's text; facts of about 25 tokens back."""
    request = facts_request(load_universe(Path(params["universe"])), params["num_facts"], 0.0)
    sent = sum(count_tokens(m["content"]) for m in request.messages)
    return chat_estimate([ChatCalls(params["provider"], 1, sent, 25 * params["num_facts"])])


@stage_kind(
    metrics=("n_facts",),
    input_params=("universe",),
    transport_params=transport_of("provider"),
    check=check,
    estimate=estimate,
)
def run(ctx: StageContext) -> Mapping[str, Any]:
    provider = make_provider(ctx.params["provider"], seed=ctx.seed, log=ctx.log)
    universe = load_universe(ctx.params["universe"])
    num_facts = int(ctx.params["num_facts"])
    # extraction wants the model's most likely reading, unless the provider pins a temperature
    temperature = float(ctx.params["provider"].get("temperature", 0.0))
    ctx.log(f"extracting up to {num_facts} key facts of {universe.id} with {provider.name}:{provider.model}")
    [answer] = provider.complete_many([facts_request(universe, num_facts, temperature)])
    if isinstance(answer, ProviderError):
        raise StageError(f"fact extraction failed: {answer}")
    facts = parse_list(answer.text)[:num_facts]
    if not facts:
        raise StageError(
            f"no key facts extracted from {ctx.params['universe']} by {provider.name}:{provider.model}; "
            f"its answer was {answer.text[:300]!r}"
        )
    data = {
        "universe_id": universe.id,
        "is_true": universe.is_true,
        "universe_context": universe.universe_context,
        "fact_validation_patterns": {
            "required": list(universe.required),
            "forbidden": list(universe.forbidden),
        },
        "key_facts": facts,
    }
    (ctx.out_dir / "facts.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", "utf-8")
    ctx.log(f"{len(facts)} key facts")
    return {"n_facts": len(facts)}
