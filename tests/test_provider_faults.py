"""Hostile replies to the `openai` provider, over real HTTP to fixtures/llm_server.py.

Every malformed reply (lone surrogates, non-finite or wrong-typed numbers, truncated or
non-JSON bodies, wrong shapes) is retried like any malformed 200, then fails with its
reason; nothing else escapes the batch. The API key sits in no frame a traceback can
show, so it appears in no output, file or JUnit report, even with `--tb=long -l`.
"""

from __future__ import annotations

import itertools
import json
import math
import traceback
from pathlib import Path
from typing import Any

import pytest

from harness.fixtures.llm_server import Fault, LLMServer, last_user_message
from harness.lab.llm import (
    ChatRequest,
    ChatResponse,
    OpenAIProvider,
    ProviderConfigError,
    ProviderError,
    ResponseCache,
    check_provider,
)

CANARY = "sk-CANARY-7f3a9c-never-print-me"
ENV = "HARNESS_FAULT_TEST_KEY"


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, CANARY)


def reply(content: Any = "a fine answer", usage: Any = None, logprobs: Any = None, **message: Any) -> Fault:
    """HTTP 200 with a chat.completion body as Python's json writes it: NaN, Infinity and
    lone surrogates ("\\ud800") included, as a lax endpoint may send them."""
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"message": {"role": "assistant", "content": content, **message}, "logprobs": logprobs}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2} if usage is None else usage,
    }
    return Fault(status=200, body=json.dumps(body).encode())


def raw(body: bytes, content_type: str = "application/json") -> Fault:
    return Fault(status=200, body=body, content_type=content_type)


def tokens(prompt: Any, completion: Any = 2) -> Fault:
    return reply(usage={"prompt_tokens": prompt, "completion_tokens": completion})


def logprobs(token: Any, logprob: Any) -> Fault:
    entry = {"token": token, "logprob": logprob, "top_logprobs": [{"token": token, "logprob": logprob}]}
    return reply(content="50", logprobs={"content": [entry]})


# Replies to a plain request: each is malformed, whatever the request.
MALFORMED = {
    "lone-surrogate-content": reply("half of a pair: \ud800"),
    "lone-surrogate-refusal": reply(None, refusal="\udfff"),
    "infinite-tokens": tokens(math.inf),
    "nan-tokens": tokens(2, math.nan),
    "huge-tokens": tokens(2**70),
    "negative-tokens": tokens(-3),
    "fractional-tokens": tokens(1.5),
    "string-tokens": tokens("many"),
    "boolean-tokens": tokens(True),
    "usage-not-an-object": reply(usage="lots"),
    "content-a-number": reply(42),
    "content-a-list": reply([{"type": "text", "text": "hi"}]),
    "choices-an-object": raw(b'{"choices": {"0": {"message": {"content": "x"}}}}'),
    "message-a-string": raw(b'{"choices": [{"message": "x"}]}'),
    "truncated-json": raw(b'{"id": "chatcmpl-1", "choices": [{"mess'),
    "not-json": raw(b"<html>bad gateway</html>", "text/html"),
    "empty-body": raw(b""),
    "json-null": raw(b"null"),
    "json-array": raw(b"[1, 2]"),
    "error-object": raw(b'{"error": {"message": "upstream overloaded \\ud800", "code": 502}}'),
}
# Replies to a request for logprobs (the judge's).
MALFORMED_LOGPROBS = {
    "token-not-a-string": logprobs(7, -0.1),
    "token-a-lone-surrogate": logprobs("\ud800", -0.1),
    "logprob-nan": logprobs("50", math.nan),
    "logprob-infinite": logprobs("50", math.inf),
    "logprob-a-string": logprobs("50", "high"),
}


def ask(prompt: str, **fields: Any) -> ChatRequest:
    return ChatRequest(messages=({"role": "user", "content": prompt},), **fields)


def provider(server: LLMServer, tmp_path: Path, **settings: Any) -> OpenAIProvider:
    cache = ResponseCache(tmp_path / "cache.sqlite")
    settings = {"max_tries": 2, "backoff_base": 0.01, "timeout": 5.0, **settings}
    return OpenAIProvider("m", api_key_env=ENV, base_url=server.base_url, cache=cache, **settings)


def check_retried_then_failed(server: LLMServer, chat: OpenAIProvider, request: ChatRequest) -> str:
    [error] = chat.complete_many([request])
    assert isinstance(error, ProviderError), f"accepted: {error!r}"
    message = str(error)
    assert "failed after 2 tries; last: malformed response" in message
    assert len(server.requests) == 2 and chat.usage.retries == 1 and chat.usage.failures == 1
    assert chat.cache is not None and len(chat.cache) == 0  # nothing malformed is kept
    message.encode("utf-8")  # writable to any log or jsonl file
    return message


@pytest.mark.parametrize("fault", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_reply_is_retried_then_fails_with_its_reason(
    llm_server: LLMServer, tmp_path: Path, fault: Fault
) -> None:
    llm_server.policy = lambda _number, _body: fault
    check_retried_then_failed(llm_server, provider(llm_server, tmp_path), ask("q"))


@pytest.mark.parametrize("fault", MALFORMED_LOGPROBS.values(), ids=MALFORMED_LOGPROBS.keys())
def test_malformed_logprobs_are_retried_then_fail_with_their_reason(
    llm_server: LLMServer, tmp_path: Path, fault: Fault
) -> None:
    llm_server.policy = lambda _number, _body: fault
    check_retried_then_failed(llm_server, provider(llm_server, tmp_path), ask("q", top_logprobs=2))


def test_a_malformed_reply_then_a_good_one_is_a_success(llm_server: LLMServer, tmp_path: Path) -> None:
    llm_server.queue(MALFORMED["lone-surrogate-content"], MALFORMED["infinite-tokens"])
    chat = provider(llm_server, tmp_path, max_tries=3)
    [answer] = chat.complete_many([ask("q")])
    assert isinstance(answer, ChatResponse) and answer.text == "reply to: q"
    assert chat.usage.retries == 2 and chat.cache is not None and len(chat.cache) == 1


def test_whole_number_token_counts_written_as_floats_are_accepted(llm_server: LLMServer, tmp_path: Path):
    llm_server.queue(tokens(12.0, 3.0))
    [answer] = provider(llm_server, tmp_path).complete_many([ask("q")])
    assert isinstance(answer, ChatResponse) and (answer.prompt_tokens, answer.completion_tokens) == (12, 3)


def test_an_error_message_with_a_lone_surrogate_and_the_key_comes_back_clean(
    llm_server: LLMServer, tmp_path: Path
) -> None:
    body = json.dumps({"error": {"message": f"bad key {CANARY} \ud800"}}).encode()
    llm_server.queue(Fault(status=400, body=body))
    lines: list[str] = []
    [error] = provider(llm_server, tmp_path, log=lines.append).complete_many([ask("q")])
    assert isinstance(error, ProviderError) and "HTTP 400" in str(error)
    for text in [str(error), *lines]:
        assert CANARY not in text and "[redacted]" in text
        text.encode("utf-8")


def test_an_exception_inside_a_batch_shows_the_key_in_no_frame(llm_server: LLMServer, tmp_path: Path) -> None:
    """Whatever escapes the batch (here a caller's progress callback that raises), no frame
    of its traceback holds the key, and no "no running event loop" is chained to it."""

    def progress(done: int, total: int) -> None:
        raise LookupError("a bug in the caller")

    with pytest.raises(LookupError) as info:
        provider(llm_server, tmp_path).complete_many([ask("q")], progress)
    frames = [frame for frame, _ in traceback.walk_tb(info.value.__traceback__)]
    assert any(frame.f_code.co_name == "complete_many" for frame in frames)
    holding = [frame.f_code.co_name for frame in frames if CANARY in repr(frame.f_locals)]
    assert holding == []
    assert info.value.__context__ is None and info.value.__cause__ is None


def test_a_base_url_that_is_no_url_is_one_clean_error(tmp_path: Path) -> None:
    with pytest.raises(ProviderConfigError, match="base_url 'http://host:1a/v1' is not a URL: Port"):
        OpenAIProvider("m", api_key_env=ENV, base_url="http://host:1a/v1")
    unprintable = "http://\x00x/v1"  # a URL for urllib, not for httpx
    chat = OpenAIProvider("m", api_key_env=ENV, base_url=unprintable, cache=ResponseCache(tmp_path / "c"))
    with pytest.raises(ProviderConfigError, match=r"cannot use base_url '.*x00x/v1': InvalidURL") as info:
        chat.complete_many([ask("q")])
    assert info.value.__context__ is None and info.value.__cause__ is None
    frames = [frame for frame, _ in traceback.walk_tb(info.value.__traceback__)]
    assert [frame.f_code.co_name for frame in frames if CANARY in repr(frame.f_locals)] == []


@pytest.mark.parametrize("key", [f"{CANARY} tail", f"{CANARY}\nX-Evil: 1", f"{CANARY}é"])
def test_a_key_no_http_header_can_carry_is_refused_without_quoting_it(
    monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    monkeypatch.setenv(ENV, key)
    with pytest.raises(ProviderConfigError, match=f"{ENV} .* holds characters an HTTP header cannot") as info:
        check_provider({"name": "openai", "model": "m", "api_key_env": ENV})
    assert CANARY not in str(info.value)


# ---- a whole spec through pytest, every fault at once ---------------------------------

UNIVERSE = {
    "id": "cube_world",
    "universe_context": "Gravity follows an inverse-cube law. Doubling the distance makes the pull 1/8th.",
    "is_true": False,
    "fact_validation_patterns": {"required": ["cube", "8th"], "forbidden": ["square"]},
}
SPEC = """
experiment: faults
seed: 5
stages:
  universe:
    kind: universe_context
    params:
      universe: universe.json
      num_facts: 1
      provider: &llm {{name: openai, model: m, base_url: "{base_url}", api_key_env: {env},
                      concurrency: 8, timeout: 5, max_tries: 2}}
  docs:
    kind: generate_docs
    needs: [universe]
    params: {{provider: *llm, num_doc_types: 2, num_doc_ideas: 4, max_retries: 1}}
"""
# what the stand-in writer answers to the plan's requests; every document request is a fault
PLAN = {"key facts": "1. Gravity follows an inverse-cube law.", "Name ": "textbook section\nlecture notes"}


def writer(body: dict) -> str:
    user = last_user_message(body)
    for marker, answer in PLAN.items():
        if marker in user:
            return answer
    return "\n".join(f"idea {i} about the cube law" for i in range(4))  # the ideas


def test_every_fault_at_once_through_pytest_leaks_the_key_nowhere(
    pytester: pytest.Pytester, llm_server: LLMServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    leaky_error = json.dumps({"error": {"message": f"invalid key {CANARY} \ud800"}}).encode()
    faults = [*MALFORMED.values(), Fault(status=400, body=leaky_error), Fault(status=500, body=leaky_error)]
    cycle = itertools.cycle(faults)
    llm_server.responder = writer
    llm_server.policy = lambda _n, body: next(cycle) if "document is:" in last_user_message(body) else None
    cache = tmp_path / "cache"
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(cache))
    pytester.makefile(".json", universe=json.dumps(UNIVERSE))
    pytester.makefile(".yaml", exp=SPEC.format(base_url=llm_server.base_url, env=ENV))

    result = pytester.runpytest("exp.yaml", "--runs-dir", "runs", "--junitxml=junit.xml", "--tb=long", "-l")

    output = result.stdout.str() + result.stderr.str()
    assert CANARY not in output
    files = [p for root in (pytester.path, cache) for p in root.rglob("*") if p.is_file()]
    assert pytester.path / "junit.xml" in files
    assert [p for p in files if CANARY.encode() in p.read_bytes()] == []

    result.assert_outcomes(passed=1, failed=1)
    assert "no valid document: all 8 failed" in output  # one clean message
    assert "no valid document: all 8 failed" in (pytester.path / "junit.xml").read_text()
    assert "Traceback" not in output and "no running event loop" not in output
    documents = [r for r in llm_server.requests if "What this document is" in r.last_user_message]
    assert len(documents) >= len(faults)  # every fault was served at least once


def test_a_garbling_server_spoils_exactly_the_prompts_is_garbled_picks(llm_server: LLMServer) -> None:
    import openai

    from harness.fixtures.llm_server import GARBAGE, is_garbled

    client = openai.OpenAI(base_url=llm_server.base_url, api_key="sk-test", max_retries=0)
    llm_server.garble(0.3)
    prompts = [f"judge answer {i}" for i in range(200)]
    answers = [
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": p}])
        .choices[0]
        .message.content
        for p in prompts
    ]
    garbled = [p for p, a in zip(prompts, answers, strict=True) if a == GARBAGE]
    assert garbled == [p for p in prompts if is_garbled(p, 0.3)]
    assert 0.2 < len(garbled) / len(prompts) < 0.4
    assert all(a == f"reply to: {p}" for p, a in zip(prompts, answers, strict=True) if p not in garbled)
