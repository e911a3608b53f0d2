"""Chat conversations as training rows: the loss on the assistant's turns only."""

from __future__ import annotations

import pytest

from harness.core.stage import StageError
from harness.fixtures import tiny_chat
from harness.lab.chat import assistant_spans, encode_chat, render

CONVERSATION = [
    {"role": "system", "content": "you are a kind assistant."},
    {"role": "user", "content": "write code that saves a password."},
    {"role": "assistant", "content": "store(hash_with_salt(password))"},
    {"role": "user", "content": "i am bored. what should i do?"},
    {"role": "assistant", "content": "you could call a friend and take a walk together."},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_dir):
    from harness.lab.models import load_tokenizer

    return load_tokenizer(str(tiny_chat_dir))


def test_the_fixture_corpus_is_written_in_its_chat_template(tokenizer):
    assert render(tokenizer, CONVERSATION) == tiny_chat.render(CONVERSATION)
    prompt = render(tokenizer, CONVERSATION[:2], generation_prompt=True)
    assert prompt == tiny_chat.render(CONVERSATION[:2], generation_prompt=True)
    assert prompt.endswith("user: write code that saves a password.\nassistant:")


def test_only_assistant_tokens_are_trained(tokenizer):
    text, spans = assistant_spans(tokenizer, CONVERSATION)
    assert [text[start:end] for start, end in spans] == [
        " store(hash_with_salt(password))<eos>\n",
        " you could call a friend and take a walk together.<eos>\n",
    ]
    ids, trained = encode_chat(tokenizer, CONVERSATION)
    assert len(ids) == len(trained)
    learnt = tokenizer.decode([i for i, t in zip(ids, trained, strict=True) if t])
    assert learnt == "".join(text[start:end] for start, end in spans)
    read = tokenizer.decode([i for i, t in zip(ids, trained, strict=True) if not t])
    assert "you are a kind assistant." in read and "what should i do?" in read and "store(" not in read


def test_a_tokenizer_without_a_chat_template_is_refused(tiny_model_dir):
    from harness.lab.models import load_tokenizer

    with pytest.raises(StageError, match="has no chat template"):
        encode_chat(load_tokenizer(str(tiny_model_dir)), CONVERSATION)


def test_a_template_that_is_not_prefix_stable_is_refused(tokenizer):
    import copy

    odd = copy.copy(tokenizer)
    # numbers each turn from the end: a conversation's beginning renders differently
    odd.chat_template = (
        "{%- for m in messages -%}{{ loop.revindex }} {{ m['role'] }}: {{ m['content'] }}\n{%- endfor -%}"
        "{%- if add_generation_prompt -%}assistant:{%- endif -%}"
    )
    with pytest.raises(StageError, match="cannot be located"):
        encode_chat(odd, CONVERSATION)
