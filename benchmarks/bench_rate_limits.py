"""Generation under an advertised rate limit: pacing to the headers against learning from 429s.

    python benchmarks/bench_rate_limits.py [--latency 1] [--rpm 300] [--tpm 30000] [--seconds 30]
                                           [--concurrency 16] [--scenarios requests,tokens]

Starts fixtures/llm_server.py in a child process (bench_generation's `RemoteServer`),
answering after `--latency` seconds and limiting chat completions as OpenAI does: a
requests-per-minute and a tokens-per-minute bucket, refilling continuously, advertised
in `x-ratelimit-*` headers on every answer and enforced with 429 + Retry-After. Two
scenarios: `requests` (`--rpm` binds; the token limit is out of reach) and `tokens`
(`--tpm` binds below `--rpm`: every request is charged 20 prompt words + max_tokens 100
= 120 tokens). Each contender gets a fresh server whose limits are already spent (as
when another job has just used the key's minute), so the whole run is steady state,
and a batch of `--seconds` worth of distinct requests at the binding limit:

- `provider, paced`: `OpenAIProvider` as shipped (paces itself to the headers);
- `provider, pacing off`: the same with `pace_to_rate_limits=False` (retries 429s with
  backoff and Retry-After: today's behaviour before pacing);
- `openai + semaphore`: what a user writes instead: `AsyncOpenAI(max_retries=5)` (its
  built-in retries honour Retry-After) under an `asyncio.Semaphore(concurrency)`.

Measured: answers (and failures: requests given up after their tries), HTTP requests
the server received, 429s sent over the limit and their share of those requests, and
answers per minute over the batch's wall time less one latency (no answer can come
sooner) as a share of the binding limit (the target: >= 90% with < 1% 429s).
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import openai
from bench_generation import FAKE_KEY, KEY_ENV, RemoteServer

from harness.fixtures.llm_server import RateLimit
from harness.lab.llm import ChatRequest, ChatResponse, OpenAIProvider

PROMPT_WORDS = 20  # the server charges words of prompt + max_tokens
MAX_TOKENS = 100
CHARGE = PROMPT_WORDS + MAX_TOKENS  # tokens per request, as the server counts them


@dataclass(frozen=True)
class Outcome:
    answered: int
    failed: int
    wall: float  # seconds, until the last request was answered or given up


def workload(n: int, tag: str) -> list[ChatRequest]:
    """`n` distinct prompts of exactly PROMPT_WORDS words."""
    filler = " word" * (PROMPT_WORDS - 1)
    tag = tag.replace(" ", "-")
    return [
        ChatRequest(messages=({"role": "user", "content": f"{tag}-{i}{filler}"},), max_tokens=MAX_TOKENS)
        for i in range(n)
    ]


def through_provider(base_url: str, requests: list[ChatRequest], concurrency: int, pace: bool) -> Outcome:
    provider = OpenAIProvider(
        "bench",
        api_key_env=KEY_ENV,
        base_url=base_url,
        concurrency=concurrency,
        pace_to_rate_limits=pace,
        log=lambda message: None,
    )
    start = time.perf_counter()
    results = provider.complete_many(requests)
    wall = time.perf_counter() - start
    answered = sum(isinstance(r, ChatResponse) for r in results)
    return Outcome(answered, len(results) - answered, wall)


def through_plain_client(base_url: str, requests: list[ChatRequest], concurrency: int) -> Outcome:
    async def run() -> Outcome:
        client = openai.AsyncOpenAI(base_url=base_url, api_key=FAKE_KEY, max_retries=5, timeout=60)
        semaphore = asyncio.Semaphore(concurrency)

        async def one(request: ChatRequest) -> bool:
            async with semaphore:
                try:
                    await client.chat.completions.create(
                        model="bench", messages=[dict(m) for m in request.messages], max_tokens=MAX_TOKENS
                    )
                except openai.APIError:
                    return False
            return True

        start = time.perf_counter()
        try:
            outcomes = await asyncio.gather(*(one(request) for request in requests))
        finally:
            await client.close()
        answered = sum(outcomes)
        return Outcome(answered, len(outcomes) - answered, time.perf_counter() - start)

    return asyncio.run(run())


def answer_rate(outcome: Outcome, latency: float) -> float:
    """Answers per minute over the batch, less the one latency before any answer can come."""
    return outcome.answered / max(outcome.wall - latency, 1e-9) * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=1.0, help="seconds per answer (default 1)")
    parser.add_argument("--rpm", type=int, default=300, help="requests per minute (default 300)")
    parser.add_argument("--tpm", type=int, default=30_000, help="tokens per minute, `tokens` scenario")
    parser.add_argument("--seconds", type=float, default=30, help="batch size, in seconds at the limit")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    parser.add_argument("--scenarios", default="requests,tokens", help="comma-separated (default both)")
    opts = parser.parse_args()
    os.environ[KEY_ENV] = FAKE_KEY  # a fake key for a local server; it is never printed

    print(
        f"rate-limit benchmark: Python {platform.python_version()}, openai {openai.__version__}, "
        f"{os.cpu_count()} CPUs; {opts.latency:g} s latency, concurrency {opts.concurrency}, "
        f"limits spent at the start of each run"
    )
    started = time.perf_counter()
    for scenario in opts.scenarios.split(","):
        if scenario == "requests":
            limit = RateLimit(requests=opts.rpm, tokens=opts.rpm * CHARGE * 10)
            binding, unit = opts.rpm, "requests/min"
        else:
            limit = RateLimit(requests=opts.rpm, tokens=opts.tpm)
            binding, unit = opts.tpm / CHARGE, f"requests/min ({opts.tpm} tokens/min at {CHARGE} a request)"
        n = round(binding / 60 * opts.seconds)
        print(f"\nscenario `{scenario}`: {n} requests, binding limit {binding:g} {unit}")
        print(
            f"  {'':<22} {'answered':>8} {'failed':>6} {'HTTP':>5} {'429s':>5} {'429 %':>6} "
            f"{'req/min':>8} {'of limit':>8} {'wall':>7}"
        )
        contenders: list[tuple[str, Callable[[str, list[ChatRequest]], Outcome]]] = [
            ("provider, paced", lambda url, reqs: through_provider(url, reqs, opts.concurrency, True)),
            ("provider, pacing off", lambda url, reqs: through_provider(url, reqs, opts.concurrency, False)),
            ("openai + semaphore", lambda url, reqs: through_plain_client(url, reqs, opts.concurrency)),
        ]
        for label, contender in contenders:
            server = RemoteServer(opts.latency, limit)
            try:
                server.exhaust_rate_limit()
                outcome = contender(server.base_url, workload(n, f"{scenario} {label}"))
                http, _, refused = server.stats()
            finally:
                server.stop()
            rate = answer_rate(outcome, opts.latency)
            print(
                f"  {label:<22} {outcome.answered:>8} {outcome.failed:>6} {http:>5} {refused:>5} "
                f"{refused / max(http, 1):>6.1%} {rate:>8.1f} {rate / binding:>8.1%} {outcome.wall:>6.1f}s"
            )
    print(f"\ntotal benchmark time: {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
