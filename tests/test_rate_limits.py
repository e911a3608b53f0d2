"""Rate limits advertised in OpenAI's `x-ratelimit-*` headers: the local server advertises
and enforces them, and the `openai` provider paces itself to them instead of learning
them from 429s. Over real HTTP with the real client; limits use short windows (a bucket
refilling in a second) so that a test takes seconds. Assertions count 429s, never time.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import openai
import pytest

from harness.fixtures.llm_server import LLMServer, RateLimit, duration_text
from harness.lab.llm import ChatRequest, ChatResponse, OpenAIProvider
from harness.lab.llm.ratelimit import RateLimiter, Ticket, parse_duration

KEY = "sk-test-rate-limits"
ENV = "HARNESS_TEST_RATE_LIMIT_KEY"


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, KEY)


def ask(prompt: str, **fields: Any) -> ChatRequest:
    return ChatRequest(messages=({"role": "user", "content": prompt},), **fields)


def provider(server: LLMServer, **settings: Any) -> OpenAIProvider:
    settings = {"concurrency": 8, "timeout": 5.0, "max_tries": 8, "log": lambda _line: None, **settings}
    return OpenAIProvider("m", api_key_env=ENV, base_url=server.base_url, **settings)


def post(client: openai.OpenAI, prompt: str, **arguments: Any) -> Any:
    """The raw response (status and headers) of one chat request, errors included."""
    try:
        return client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": prompt}], **arguments
        )
    except openai.APIStatusError as error:
        return error.response


# -- the duration format of the reset headers ------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("120ms", 0.12),
        ("1h2m3.5s", 3723.5),
        ("8.64s", 8.64),
        ("1m6.5s", 66.5),
        ("250us", 0.00025),
        ("250µs", 0.00025),
        ("900ns", 9e-7),
        ("0s", 0.0),
        ("2.5", 2.5),  # a bare number: seconds
        (" 17ms ", 0.017),
    ],
)
def test_reset_durations_parse_as_openai_writes_them(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "1x", "1s2", "ms", "-1s", "1s 2s", "inf", "nan"])
def test_a_reset_that_is_no_duration_is_none(text: str) -> None:
    assert parse_duration(text) is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.12, "120ms"), (0.0001, "1ms"), (1.5, "1.5s"), (360, "6m0s"), (3723.5, "1h2m3.5s")],
)
def test_the_server_writes_resets_in_openais_format(seconds: float, text: str) -> None:
    assert duration_text(seconds) == text
    assert parse_duration(text) == pytest.approx(max(seconds, 0.001 if seconds else 0))


# -- the server advertises and enforces ------------------------------------------------


def test_the_server_advertises_its_request_limit_and_refuses_over_it() -> None:
    with LLMServer(rate_limit=RateLimit(requests=3, tokens=100, window=60)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
        started = time.monotonic()
        answers = [post(client, "a b c", max_tokens=7) for _ in range(4)]
        elapsed = time.monotonic() - started  # a loaded machine takes a while between requests
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert [a.headers["x-ratelimit-limit-requests"] for a in answers] == ["3"] * 4
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["2", "1", "0", "0"]
    # a bucket refilling 3 a minute: 20 s per request used, less the moments elapsed
    resets = [parse_duration(a.headers["x-ratelimit-reset-requests"]) for a in answers]
    assert 20 - elapsed - 0.5 <= resets[0] <= 20.5 and 60 - elapsed - 0.5 <= resets[2] <= 60.5
    # tokens: 3 prompt words + max_tokens 7 per admitted request; the refused one is not charged
    assert [a.headers["x-ratelimit-remaining-tokens"] for a in answers] == ["90", "80", "70", "70"]
    assert 19 <= int(answers[3].headers["retry-after"]) <= 20
    assert answers[3].json()["error"]["type"] == "rate_limit_exceeded"
    assert server.rate_limited == 1 and len(server.requests) == 4


def test_the_server_enforces_its_token_limit_and_charges_unbounded_completions_when_answered() -> None:
    with LLMServer(rate_limit=RateLimit(tokens=30, window=3600)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
        first = post(client, "a b c")  # no max_tokens: 3 now, "reply to: a b c" (5) once answered
        second = post(client, "a b c", max_tokens=20)  # 3 + 20 > 30 - 8
        third = post(client, "a b c", max_tokens=10)
    assert "x-ratelimit-limit-requests" not in first.headers  # only the limits that exist
    assert (first.status_code, first.headers["x-ratelimit-remaining-tokens"]) == (200, "27")
    assert (second.status_code, second.headers["x-ratelimit-remaining-tokens"]) == (429, "22")
    assert (third.status_code, third.headers["x-ratelimit-remaining-tokens"]) == (200, "9")
    assert server.rate_limited == 1


def test_the_bucket_refills_continuously() -> None:
    with LLMServer(rate_limit=RateLimit(requests=2, window=0.4)) as server:  # 5 a second
        client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
        assert [post(client, "q").status_code for _ in range(3)] == [200, 200, 429]
        server._stopping.wait(0.25)  # refills 1.25 requests
        assert post(client, "q").status_code == 200
    assert server.rate_limited == 1


def test_a_server_without_a_limit_sends_no_rate_limit_headers(llm_server: LLMServer) -> None:
    client = openai.OpenAI(base_url=llm_server.base_url, api_key=KEY, max_retries=0)
    answer = post(client, "q")
    assert answer.status_code == 200
    assert not [name for name in answer.headers if name.startswith("x-ratelimit")]


# -- the pacer's bookkeeping (a frozen clock) ------------------------------------------


def headers(kind: str, limit: int, remaining: int, reset: str) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{kind}": str(limit),
        f"x-ratelimit-remaining-{kind}": str(remaining),
        f"x-ratelimit-reset-{kind}": reset,
    }


def take(
    pacer: RateLimiter, messages: list[dict[str, str]], max_tokens: int | None, wait: float = 2
) -> Ticket:
    """A ticket that needs no wait (a frozen clock would never end one)."""
    return asyncio.run(asyncio.wait_for(pacer.acquire(messages, max_tokens), timeout=wait))


def test_the_first_request_goes_alone() -> None:
    pacer = RateLimiter(clock=lambda: 0.0)
    probe = take(pacer, [], 1)
    with pytest.raises(TimeoutError):  # the second waits for what the first one says
        take(pacer, [], 1, wait=0.2)
    pacer.settle(probe, None)  # no limits: nothing waits any more
    for _ in range(3):
        take(pacer, [], 1)  # would raise TimeoutError if it waited
    assert pacer.buckets == {}


def test_requests_sent_after_an_answered_one_count_against_what_its_headers_report() -> None:
    pacer = RateLimiter(clock=lambda: 100.0)
    pacer.settle(take(pacer, [], 10), headers("requests", 60, 20, "40s"))  # 1 a second
    bucket = pacer.buckets["requests"]
    assert bucket.level_at(100.0) == 20 and bucket.rate == 1.0
    first, second, *_ = [take(pacer, [{"content": "q"}], 10) for _ in range(4)]
    assert bucket.level_at(100.0) == 16
    # the endpoint had 5 left when it took the first (another job spends the key too);
    # it had not seen the 3 sent since
    pacer.settle(first, headers("requests", 60, 5, "55s"), usage=(3, 4))
    assert bucket.level_at(100.0) == 2 and bucket.seconds_until(1, 100.0) == 0
    # someone else spent the rest: nothing left when it took the second, 2 sent since
    pacer.settle(second, headers("requests", 60, 0, "1m0s"))
    assert bucket.level_at(100.0) == -2 and bucket.seconds_until(1, 100.0) == pytest.approx(3.0)


def test_token_estimates_are_corrected_from_usage() -> None:
    now = [0.0]
    pacer = RateLimiter(clock=lambda: now[0])
    probe = take(pacer, [{"content": "x" * 400}], None)
    assert probe.tokens == 100 + 4 + 16  # chars / 4, framing, a default completion
    pacer.settle(probe, headers("tokens", 6000, 5880, "1.2s"), usage=(90, 30))  # 100 tokens a second
    assert pacer.buckets["tokens"].level_at(0.0) == 5880
    ticket = take(pacer, [{"content": "x" * 400}], None)
    assert ticket.tokens == 104 + 30  # the completions seen so far
    assert pacer.buckets["tokens"].level_at(0.0) == 5880 - 134
    pacer.settle(ticket, None, usage=(90, 60))  # it cost 150: the bucket pays the difference
    assert pacer.buckets["tokens"].level_at(0.0) == 5880 - 150
    now[0] = 1.0
    assert pacer.buckets["tokens"].level_at(1.0) == 5880 - 50


def test_headers_only_ever_lower_the_belief() -> None:
    pacer = RateLimiter(clock=lambda: 0.0)
    pacer.settle(take(pacer, [], 1), headers("requests", 100, 10, "54s"))
    first, second = take(pacer, [], 1), take(pacer, [], 1)
    assert pacer.buckets["requests"].level_at(0.0) == 8
    pacer.settle(first, headers("requests", 100, 9, "55s"))  # 9 left, less the second: as believed
    pacer.settle(second, headers("requests", 100, 90, "6s"))  # stale or out of order: ignored
    assert pacer.buckets["requests"].level_at(0.0) == 8


# -- the provider paces itself ---------------------------------------------------------


def prompts(n: int, tag: str) -> list[ChatRequest]:
    return [ask(f"{tag} prompt {i}", max_tokens=8) for i in range(n)]


def test_the_provider_paces_to_a_request_limit_where_an_unpaced_one_hits_429s() -> None:
    limit = RateLimit(requests=20, window=1.0)  # 20 a second, a burst of 20
    with LLMServer(latency=0.02, rate_limit=limit) as server:
        chat = provider(server)
        results = chat.complete_many(prompts(60, "paced"))
        assert all(isinstance(r, ChatResponse) for r in results)
        assert server.rate_limited <= 1
        assert "paced to the endpoint's limits (20 requests)" in chat_log(chat, prompts(1, "log"))
    with LLMServer(latency=0.02, rate_limit=limit) as server:
        results = provider(server, pace_to_rate_limits=False, backoff_cap=1).complete_many(prompts(60, "x"))
        assert all(isinstance(r, ChatResponse) for r in results)
        assert server.rate_limited >= 20  # the same batch, learning the limit from 429s


def test_a_limit_another_job_has_spent_costs_one_429_not_a_wave() -> None:
    # a slow refill (2 a second): starting the client does not refill the limit first
    with LLMServer(latency=0.02, rate_limit=RateLimit(requests=4, window=2.0)) as server:
        server.exhaust_rate_limit()
        results = provider(server).complete_many(prompts(6, "spent"))
        assert all(isinstance(r, ChatResponse) for r in results)
        assert server.rate_limited <= 1  # the first request, alone: then the headers are known


def test_the_provider_paces_to_a_token_limit() -> None:
    # "tokens prompt i" (3 words) + max_tokens 8: 11 tokens a request, ~18 a second
    limit = RateLimit(requests=1000, tokens=200, window=1.0)
    with LLMServer(latency=0.02, rate_limit=limit) as server:
        results = provider(server).complete_many(prompts(40, "tokens"))
        assert all(isinstance(r, ChatResponse) for r in results)
        assert server.rate_limited <= 1
    with LLMServer(latency=0.02, rate_limit=limit) as server:
        provider(server, pace_to_rate_limits=False, backoff_cap=1).complete_many(prompts(40, "tokens"))
        assert server.rate_limited >= 10


def test_an_endpoint_without_limits_is_not_paced(llm_server: LLMServer) -> None:
    chat = provider(llm_server, concurrency=16)
    llm_server.latency = 0.05
    results = chat.complete_many(prompts(32, "free"))
    assert all(isinstance(r, ChatResponse) for r in results)
    assert chat.pacer is not None and chat.pacer.buckets == {}
    assert llm_server.max_in_flight == 16  # the concurrency bound alone


def chat_log(chat: OpenAIProvider, requests: list[ChatRequest]) -> str:
    lines: list[str] = []
    chat.log = lines.append
    chat.complete_many(requests)
    return "\n".join(lines)
