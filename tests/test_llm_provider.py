"""The `openai` provider over real HTTP: the official client against fixtures/llm_server.py.

Nothing is mocked: every test sends real requests to a local OpenAI-compatible server
that injects the faults under test (429 with Retry-After, 500, malformed bodies, slow
answers, rejected keys) and records what it received, so tries can be counted.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from harness.fixtures.llm_server import Fault, LLMServer
from harness.lab.llm import (
    TRANSPORT_KEYS,
    ChatRequest,
    ChatResponse,
    OfflineProvider,
    OpenAIProvider,
    ProviderConfigError,
    ProviderError,
    ResponseCache,
    check_provider,
    make_provider,
    request_key,
)

KEY = "sk-test-SECRET-1234"
ENV = "HARNESS_TEST_LLM_KEY"


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(ENV, KEY)
    return KEY


def ask(prompt: str, **fields: Any) -> ChatRequest:
    return ChatRequest(messages=({"role": "user", "content": prompt},), **fields)


def provider(server: LLMServer, *, cache: ResponseCache | None = None, **settings: Any) -> OpenAIProvider:
    settings = {"concurrency": 4, "timeout": 5.0, "max_tries": 4, "backoff_base": 0.01, **settings}
    return OpenAIProvider("test-model", api_key_env=ENV, base_url=server.base_url, cache=cache, **settings)


def texts(results: list[ChatResponse | ProviderError]) -> list[str]:
    return [r.text if isinstance(r, ChatResponse) else f"ERROR {r}" for r in results]


# -- batches, concurrency, order -------------------------------------------------------


def test_concurrent_batch_keeps_order_through_faults(llm_server: LLMServer) -> None:
    llm_server.latency = 0.01
    llm_server.malformed_next(2)
    llm_server.fail_every(5, status=500)  # requests 5, 10, ... by arrival
    prompts = [f"prompt {i}" for i in range(50)]
    seen: list[tuple[int, int]] = []
    chat = provider(llm_server, concurrency=8, max_tries=6)

    results = chat.complete_many(
        [ask(p) for p in prompts], progress=lambda done, total: seen.append((done, total))
    )

    assert texts(results) == [f"reply to: {p}" for p in prompts]
    answered = [r for r in llm_server.requests if r.fault is None]
    assert sorted(r.last_user_message for r in answered) == sorted(prompts)  # each answered exactly once
    faulted = len(llm_server.requests) - len(answered)
    assert faulted >= 2 + 50 // 5
    assert 1 < llm_server.max_in_flight <= 8
    assert chat.usage.to_json() == {
        "requests": 50,
        "cached": 0,
        "retries": faulted,
        "failures": 0,
        "prompt_tokens": 100,
        "completion_tokens": 200,
    }
    assert seen[-1] == (50, 50) and [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert {r.headers["authorization"] for r in llm_server.requests} == {f"Bearer {KEY}"}


def test_duplicate_requests_in_a_batch_are_sent_once(llm_server: LLMServer) -> None:
    chat = provider(llm_server)
    results = chat.complete_many([ask("same"), ask("other"), ask("same")])
    assert texts(results) == ["reply to: same", "reply to: other", "reply to: same"]
    assert len(llm_server.requests) == 2
    assert [r.cached for r in results if isinstance(r, ChatResponse)] == [False, False, True]


def test_works_when_called_inside_a_running_event_loop(llm_server: LLMServer) -> None:
    async def from_async_code() -> list[ChatResponse | ProviderError]:
        return provider(llm_server).complete_many([ask("from a notebook")])

    assert texts(asyncio.run(from_async_code())) == ["reply to: from a notebook"]


# -- retries ---------------------------------------------------------------------------


def test_429_waits_at_least_retry_after(llm_server: LLMServer) -> None:
    llm_server.fail_next(1, status=429, retry_after=1)
    chat = provider(llm_server, backoff_cap=0.05)
    assert texts(chat.complete_many([ask("patience")])) == ["reply to: patience"]
    first, second = llm_server.requests
    assert first.fault is not None and first.fault.status == 429
    assert second.received_at - first.received_at >= 1.0
    assert chat.usage.retries == 1


def test_500_is_retried_until_success(llm_server: LLMServer) -> None:
    llm_server.fail_next(2, status=500)
    chat = provider(llm_server)
    assert texts(chat.complete_many([ask("flaky")])) == ["reply to: flaky"]
    assert len(llm_server.tries_for("flaky")) == 3
    assert (chat.usage.retries, chat.usage.failures) == (2, 0)


@pytest.mark.parametrize(
    "fault",
    [
        Fault(status=200, body=b'{"id": "chatcmpl-1", "choices": [{"mess'),  # truncated JSON
        Fault(status=200, body=b"<html>bad gateway</html>", content_type="text/html"),
        Fault(status=200, body=b'{"error": {"message": "upstream overloaded", "code": 502}}'),  # OpenRouter
        Fault(status=200, body=b'{"id": "x", "object": "chat.completion", "choices": []}'),
        Fault(status=200, body=b'{"id": "x", "object": "chat.completion", "choices": [{"message": "?"}]}'),
    ],
    ids=["truncated-json", "not-json", "error-object", "no-choices", "odd-shape"],
)
def test_malformed_responses_are_retried(llm_server: LLMServer, fault: Fault) -> None:
    llm_server.queue(fault)
    chat = provider(llm_server)
    assert texts(chat.complete_many([ask("garbled")])) == ["reply to: garbled"]
    assert len(llm_server.requests) == 2 and chat.usage.retries == 1


def test_a_slow_answer_times_out_and_is_retried(llm_server: LLMServer) -> None:
    llm_server.slow_next(1, delay=2.0)
    chat = provider(llm_server, timeout=0.3)
    start = time.monotonic()
    assert texts(chat.complete_many([ask("slow")])) == ["reply to: slow"]
    assert time.monotonic() - start < 1.5  # did not wait for the slow answer
    assert len(llm_server.requests) == 2 and chat.usage.retries == 1


def test_tries_are_bounded_and_the_rest_of_the_batch_is_unaffected(llm_server: LLMServer) -> None:
    llm_server.fail_matching("doomed", status=503)
    chat = provider(llm_server, max_tries=3)
    results = chat.complete_many([ask("fine 1"), ask("doomed"), ask("fine 2")])
    assert texts(results)[0::2] == ["reply to: fine 1", "reply to: fine 2"]
    error = results[1]
    assert isinstance(error, ProviderError)
    assert "HTTP 503" in str(error) and "3 tries" in str(error)
    assert len(llm_server.tries_for("doomed")) == 3
    assert (chat.usage.retries, chat.usage.failures) == (2, 1)


@pytest.mark.parametrize("status", [400, 404])
def test_client_errors_are_not_retried(llm_server: LLMServer, status: int) -> None:
    llm_server.fail_next(1, status=status)
    [error] = provider(llm_server).complete_many([ask("bad")])
    assert isinstance(error, ProviderError)
    assert f"HTTP {status}" in str(error) and "not retried" in str(error)
    assert len(llm_server.requests) == 1


def test_rejected_key_is_not_retried_and_named_by_its_variable(llm_server: LLMServer) -> None:
    llm_server.api_key = "sk-the-one-the-server-wants"
    chat = provider(llm_server)
    results = chat.complete_many([ask("a"), ask("b")])
    assert len(llm_server.requests) == 2  # one try each
    for error in results:
        assert isinstance(error, ProviderError)
        assert ENV in str(error) and "401" in str(error) and KEY not in str(error)
    assert chat.usage.failures == 2 and chat.usage.retries == 0


# -- logprobs --------------------------------------------------------------------------


def test_top_logprobs_are_returned_and_cached(llm_server: LLMServer, tmp_path: Path) -> None:
    planted = [
        [{"token": "Yes", "logprob": -0.1}, {"token": "No", "logprob": -2.4}],
        [{"token": ".", "logprob": -0.01}, {"token": "!", "logprob": -4.7}],
    ]
    llm_server.responder = lambda body: {"content": "Yes .", "top_logprobs": planted}
    expected = ({"Yes": -0.1, "No": -2.4}, {".": -0.01, "!": -4.7})
    cache = ResponseCache(tmp_path / "cache.sqlite")

    [fresh] = provider(llm_server, cache=cache).complete_many([ask("judge", top_logprobs=2)])
    [again] = provider(llm_server, cache=cache).complete_many([ask("judge", top_logprobs=2)])

    assert isinstance(fresh, ChatResponse) and isinstance(again, ChatResponse)
    assert fresh.top_logprobs == expected and again.top_logprobs == expected and again.cached
    assert (
        llm_server.requests[0].body["logprobs"] is True and llm_server.requests[0].body["top_logprobs"] == 2
    )
    assert len(llm_server.requests) == 1


def test_missing_logprobs_fail_without_retrying(llm_server: LLMServer) -> None:
    llm_server.supports_logprobs = False
    [error] = provider(llm_server).complete_many([ask("judge", top_logprobs=5)])
    assert isinstance(error, ProviderError) and "no logprobs" in str(error)
    assert len(llm_server.requests) == 1


# -- the response cache ----------------------------------------------------------------


def test_a_rerun_is_served_from_the_cache_without_network_or_key(
    llm_server: LLMServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_path = tmp_path / "cache.sqlite"
    requests = [ask(f"q{i}") for i in range(10)]
    first = provider(llm_server, cache=ResponseCache(cache_path)).complete_many(requests)
    assert len(llm_server.requests) == 10

    monkeypatch.delenv(ENV)  # a cached rerun needs no key
    rerun = provider(llm_server, cache=ResponseCache(cache_path), concurrency=1, timeout=99, max_tries=1)
    again = rerun.complete_many(requests)

    assert len(llm_server.requests) == 10  # zero new HTTP requests
    assert texts(again) == texts(first)
    assert all(isinstance(r, ChatResponse) and r.cached for r in again)
    assert (rerun.usage.requests, rerun.usage.cached, rerun.usage.prompt_tokens) == (10, 10, 0)


def test_the_cache_key_is_the_request_content_not_the_transport(
    llm_server: LLMServer, tmp_path: Path
) -> None:
    cache = ResponseCache(tmp_path / "cache.sqlite")
    base = ask("q", temperature=0.7)
    provider(llm_server, cache=cache).complete_many([base])
    provider(llm_server, cache=cache, concurrency=16, timeout=1.0, max_tries=2).complete_many([base])
    assert len(llm_server.requests) == 1
    for changed in (ask("q", temperature=1.0), ask("q", temperature=0.7, sample_index=1)):
        provider(llm_server, cache=cache).complete_many([changed])
    assert len(llm_server.requests) == 3

    here = "http://127.0.0.1:1/v1"
    offline_only = ask("q", temperature=0.7, task="document", variables={"fact": "x"})
    assert request_key("m", offline_only, here) == request_key("m", base, here)
    greedy, written_as_float = ask("q", temperature=0), ask("q", temperature=0.0)
    assert request_key("m", greedy, here) == request_key("m", written_as_float, here)
    assert request_key("other-model", base, here) != request_key("m", base, here)
    assert request_key("m", base, "http://127.0.0.1:2/v1") != request_key("m", base, here)
    assert request_key("m", base, here, seed=1) != request_key("m", base, here)
    assert TRANSPORT_KEYS == ("concurrency", "timeout", "max_tries")


def test_another_endpoint_is_another_cache_entry(llm_server: LLMServer, tmp_path: Path) -> None:
    """Same model name, same request, a new endpoint: its own answer, not the old endpoint's."""
    cache = ResponseCache(tmp_path / "cache.sqlite")
    request = ask("which law?", temperature=0.7)
    with LLMServer(lambda body: "the cube law") as other:
        [old] = provider(llm_server, cache=cache).complete_many([request])
        [new] = provider(other, cache=cache).complete_many([request])
        [again] = provider(other, cache=cache).complete_many([request])
        assert len(other.requests) == 1
    assert (old.text, new.text, again.text) == ("reply to: which law?", "the cube law", "the cube law")
    assert again.cached and not new.cached


def test_one_endpoint_written_two_ways_is_one_cache_entry(llm_server: LLMServer, tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "cache.sqlite")
    request = ask("q")
    provider(llm_server, cache=cache).complete_many([request])
    written = llm_server.base_url.replace("http://", "HTTP://") + "/"
    chat = OpenAIProvider("test-model", api_key_env=ENV, base_url=written, cache=cache)
    [answer] = chat.complete_many([request])
    assert answer.cached and len(llm_server.requests) == 1


def test_a_seeded_provider_sends_a_seed_per_sample_and_keys_on_it(llm_server: LLMServer, tmp_path: Path):
    """A sampled request carries a seed derived from the provider's seed and its sample_index;
    another seed is another sample. A greedy request (the judge) is the same whatever the seed."""
    llm_server.responder = lambda body: f"sample with seed {body.get('seed')}"
    cache = ResponseCache(tmp_path / "cache.sqlite")
    sampled = [ask("q", temperature=1.0, sample_index=k) for k in range(3)]
    greedy = ask("judge this", temperature=0.0)

    first = provider(llm_server, cache=cache, seed=0).complete_many([*sampled, greedy])
    bodies = [r.body for r in llm_server.requests]  # in order of arrival, not of the batch
    seeds = [body.get("seed") for body in bodies if body["temperature"] > 0]
    assert all(isinstance(s, int) for s in seeds) and len(set(seeds)) == 3
    assert [body for body in bodies if body["temperature"] == 0 and "seed" not in body]

    again = provider(llm_server, cache=cache, seed=0).complete_many([*sampled, greedy])
    assert texts(again) == texts(first) and len(llm_server.requests) == 4
    other = provider(llm_server, cache=cache, seed=1).complete_many([*sampled, greedy])
    assert len(llm_server.requests) == 7  # three new samples; the greedy answer is reused
    assert set(texts(other[:3])).isdisjoint(texts(first[:3])) and other[3].cached


def test_failures_are_not_cached(llm_server: LLMServer, tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "cache.sqlite")
    llm_server.fail_next(2, status=500)
    [error] = provider(llm_server, cache=cache, max_tries=2).complete_many([ask("q")])
    assert isinstance(error, ProviderError) and len(cache) == 0
    [answer] = provider(llm_server, cache=cache).complete_many([ask("q")])
    assert isinstance(answer, ChatResponse) and not answer.cached and len(cache) == 1


# -- the key stays secret --------------------------------------------------------------


def test_the_key_is_written_nowhere(llm_server: LLMServer, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    log_file = runs / "stage.log"
    lines: list[str] = []

    def log(message: str) -> None:
        lines.append(message)
        with log_file.open("a") as handle:
            handle.write(message + "\n")

    chat = make_provider(
        {"name": "openai", "model": "m", "base_url": llm_server.base_url, "api_key_env": ENV, "max_tries": 2},
        cache_path=tmp_path / "cache" / "llm-responses.sqlite",
        log=log,
    )
    assert isinstance(chat, OpenAIProvider)
    chat.backoff_base = 0.01
    # an endpoint that echoes the key in its error message must not get it into ours
    leaky = Fault(status=500, body=b'{"error": {"message": "bad key ' + KEY.encode() + b'"}}')
    llm_server.fail_matching("leak", leaky)
    results = chat.complete_many([ask("fine"), ask("leak")])
    (runs / "results.txt").write_text("\n".join(map(str, results)) + repr(chat))
    llm_server.api_key = "something else"
    results += chat.complete_many([ask("rejected")])

    assert isinstance(results[0], ChatResponse)
    assert all(isinstance(error, ProviderError) for error in results[1:])
    assert "[redacted]" in str(results[1])
    messages = [str(r) for r in results] + lines + [repr(chat), repr(chat.cache)]
    assert not [m for m in messages if KEY in m]
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.name.startswith("llm-responses.sqlite") for path in files) and log_file in files
    assert [path for path in files if KEY.encode() in path.read_bytes()] == []
    assert KEY not in repr(vars(chat))


# -- configuration ---------------------------------------------------------------------


def test_check_provider_names_the_missing_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    config = {"name": "openai", "model": "m", "api_key_env": "OPENROUTER_API_KEY"}
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    with pytest.raises(ProviderConfigError) as missing:
        check_provider(config)
    message = str(missing.value)
    assert "OPENROUTER_API_KEY" in message and "not set" in message and "--profile tiny" in message

    monkeypatch.setenv("OPENROUTER_API_KEY", "  ")
    with pytest.raises(ProviderConfigError, match="OPENROUTER_API_KEY .* is empty"):
        check_provider(config)

    monkeypatch.setenv("OPENROUTER_API_KEY", KEY)
    check_provider(config)
    check_provider({"name": "offline"})
    with pytest.raises(ProviderConfigError, match="unknown provider 'anthropic'"):
        check_provider({"name": "anthropic"})


def test_make_provider_builds_what_the_spec_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    offline = make_provider({"name": "offline"})
    assert isinstance(offline, OfflineProvider) and offline.model == "templates"

    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "shared-cache"))
    config = {
        "name": "openai",
        "model": "m",
        "api_key_env": ENV,
        "concurrency": 3,
        "timeout": 7,
        "max_tries": 2,
    }
    chat = make_provider(config, log=lambda message: None)
    assert isinstance(chat, OpenAIProvider)
    assert (chat.concurrency, chat.timeout, chat.max_tries, chat.base_url) == (3, 7.0, 2, None)
    assert chat.cache is not None and chat.cache.path == tmp_path / "shared-cache" / "llm-responses.sqlite"


def test_a_batch_that_needs_the_network_fails_clearly_without_its_key(
    llm_server: LLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV)
    with pytest.raises(ProviderConfigError, match=ENV):
        provider(llm_server).complete_many([ask("q")])
    assert llm_server.requests == []
