"""What every provider offers: chat requests in, responses out, usage counted.

A stage builds `ChatRequest`s and hands a batch to `Provider.complete_many`; the
provider decides how (HTTP with retries and a response cache, or offline templates).
`task` and `variables` say what a request is for, so the offline provider can answer
it from templates; the `openai` provider sends only `messages`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class ProviderError(Exception):
    """A request that failed for good (tries exhausted, bad credentials, bad response)."""


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[Mapping[str, str], ...]  # {"role": ..., "content": ...}
    task: str = "chat"  # what the request is for, e.g. "extract_facts", "document", "judge"
    variables: Mapping[str, Any] = field(default_factory=dict)  # the task's inputs, for offline
    temperature: float = 0.0
    max_tokens: int | None = None
    top_logprobs: int | None = None  # ask for this many alternatives per output token
    sample_index: int = 0  # repeated samples of one prompt: part of the cache key


@dataclass(frozen=True)
class ChatResponse:
    text: str
    # per output token: {token: logprob} of the top alternatives (None when not asked)
    top_logprobs: tuple[Mapping[str, float], ...] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False


@dataclass
class Usage:
    requests: int = 0
    cached: int = 0
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_json(self) -> dict[str, int]:
        return dict(self.__dict__)


Progress = Callable[[int, int], None]  # (done, total)


class Provider(Protocol):
    name: str
    model: str
    usage: Usage

    def complete_many(
        self, requests: Sequence[ChatRequest], progress: Progress | None = None
    ) -> list[ChatResponse | ProviderError]:
        """Answer every request, in order; a request that failed for good is its error."""
        ...
