"""`offline`: deterministic answers from templates, no network.

It is a fixture, not a language model: each request's `task` names a template function
registered with `@offline_task`, which answers from the request's `variables`. Template
modules are listed in `TEMPLATE_MODULES` and imported on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

from harness.lab.llm.base import ChatRequest, ChatResponse, Progress, ProviderError, Usage

Template = Callable[[ChatRequest], str]
OFFLINE_TASKS: dict[str, Template] = {}
TEMPLATE_MODULES = (
    "harness.lab.llm.offline_sdf",
    "harness.lab.llm.offline_judge",
    "harness.lab.llm.offline_persona",
    "harness.lab.llm.offline_qa_docs",
    "harness.lab.llm.offline_belief",
    "harness.lab.llm.offline_safety",
)


def offline_task(name: str) -> Callable[[Template], Template]:
    def register(template: Template) -> Template:
        OFFLINE_TASKS[name] = template
        return template

    return register


def _templates() -> dict[str, Template]:
    for module in TEMPLATE_MODULES:
        importlib.import_module(module)
    return OFFLINE_TASKS


class OfflineProvider:
    name = "offline"

    def __init__(self, model: str = "templates"):
        self.model = model
        self.usage = Usage()

    def complete_many(
        self, requests: Sequence[ChatRequest], progress: Progress | None = None
    ) -> list[ChatResponse | ProviderError]:
        templates = _templates()
        answers: list[ChatResponse | ProviderError] = []
        for done, request in enumerate(requests, 1):
            template = templates.get(request.task)
            if template is None:
                known = ", ".join(sorted(templates))
                message = f"the offline provider has no template for task {request.task!r} (has: {known})"
                answers.append(ProviderError(message))
                self.usage.failures += 1
            else:
                text = template(request)
                answers.append(ChatResponse(text=text, completion_tokens=len(text.split())))
                self.usage.completion_tokens += len(text.split())
            self.usage.requests += 1
            if progress:
                progress(done, len(requests))
        return answers
