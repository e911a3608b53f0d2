"""Chat conversations as training rows: the loss on the assistant's turns only.

A conversation is a list of {"role": system | user | assistant, "content": str}. It is
rendered with the tokenizer's chat template, and each assistant turn's characters are
found by rendering the conversation up to that turn twice: up to the turn with the
generation prompt (where the assistant's text starts) and including the turn (where it
ends, end-of-turn marks included). Tokens whose characters fall inside an assistant span
are labelled; every other token (system, user, template scaffolding, padding) is not.
This needs a template whose renderings of a conversation's prefixes are prefixes of its
rendering, which the common templates are; one that is not is refused with a StageError.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from harness.core.stage import StageError

Conversation = Sequence[Mapping[str, str]]


def render(tokenizer: Any, messages: Conversation, generation_prompt: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise StageError(
            f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
            "chat data needs one (an instruct model's tokenizer has it)"
        )
    prompt = generation_prompt
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=prompt)


def assistant_spans(tokenizer: Any, messages: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans of its assistant turns."""
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], generation_prompt=True))
        through = render(tokenizer, messages[: i + 1])
        if not text.startswith(through) or start > len(through):
            raise StageError(
                "the chat template renders a conversation's beginning differently from the whole "
                "conversation, so the assistant's turns cannot be located for the loss"
            )
        spans.append((start, len(through)))
    return text, spans


def encode_chat(tokenizer: Any, messages: Conversation) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is trained on."""
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    trained = [
        any(start <= begin and end <= stop for start, stop in spans) and end > begin
        for begin, end in encoded["offset_mapping"]
    ]
    return list(encoded["input_ids"]), trained
