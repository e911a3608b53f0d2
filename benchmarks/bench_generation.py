"""Throughput of the `openai` provider against a local endpoint with a fixed latency.

    python benchmarks/bench_generation.py [--requests 200] [--latency 0.05]
                                          [--concurrency 1,4,16,64] [--repeats 1] [--no-baseline]

Starts fixtures/llm_server.py in a process of its own (as a real endpoint would be: it
must not share the client's GIL), answering every request after `--latency` seconds,
and sends `--requests` distinct requests through `OpenAIProvider` (response cache off)
at each concurrency. With a fixed latency the best possible rate is
min(concurrency, requests) / latency requests per second; the table shows how much
of that bound is reached, i.e. what the provider's own overhead (asyncio, the openai
client, JSON, the local server's threads) costs. The baseline row is a plain
sequential loop with the synchronous openai client, measured in the same run; the last
row is a rerun answered entirely from a warm response cache. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import openai

from harness.fixtures.llm_server import LLMServer, RateLimit
from harness.lab.llm import ChatRequest, ChatResponse, OpenAIProvider, ResponseCache

KEY_ENV = "HARNESS_BENCH_KEY"
FAKE_KEY = "sk-bench-not-a-real-key"


class RemoteServer:
    """An `LLMServer` in a child process, driven over a pipe (reset, stats, exhaust, stop)."""

    def __init__(self, latency: float, rate_limit: RateLimit | None = None):
        context = multiprocessing.get_context("spawn")
        self._pipe, child_end = context.Pipe()
        self._process = context.Process(target=_serve, args=(child_end, latency, rate_limit), daemon=True)
        self._process.start()
        self.base_url: str = self._pipe.recv()

    def _ask(self, command: str) -> Any:
        self._pipe.send(command)
        return self._pipe.recv()

    def reset(self) -> None:
        self._ask("reset")

    def stats(self) -> tuple[int, int, int]:
        """(requests received, most in flight at once, 429s over the rate limit) since the last reset."""
        return self._ask("stats")

    def exhaust_rate_limit(self) -> None:
        self._ask("exhaust")

    def stop(self) -> None:
        self._ask("stop")
        self._process.join(timeout=10)


def _serve(pipe: Connection, latency: float, rate_limit: RateLimit | None) -> None:
    with LLMServer(latency=latency, rate_limit=rate_limit) as server:
        pipe.send(server.base_url)
        while (command := pipe.recv()) != "stop":
            if command == "reset":
                server.reset()
                pipe.send(None)
            elif command == "exhaust":
                server.exhaust_rate_limit()
                pipe.send(None)
            elif command == "stats":
                pipe.send((len(server.requests), server.max_in_flight, server.rate_limited))
        pipe.send(None)


def requests_for(n: int) -> list[ChatRequest]:
    return [ChatRequest(messages=({"role": "user", "content": f"benchmark prompt {i}"},)) for i in range(n)]


@dataclass(frozen=True)
class Timing:
    wall: float  # seconds, median over repeats
    cpu_ms: float  # this process's CPU per request (the server runs elsewhere), median
    n: int  # requests answered


def timed(run: Callable[[], int], repeats: int) -> Timing:
    walls, cpus, n = [], [], 0
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        n = run()
        walls.append(time.perf_counter() - start)
        cpus.append((time.process_time() - cpu) * 1000 / max(n, 1))
    return Timing(statistics.median(walls), statistics.median(cpus), n)


def sequential_baseline(server: RemoteServer, requests: list[ChatRequest]) -> int:
    client = openai.OpenAI(base_url=server.base_url, api_key=FAKE_KEY, max_retries=0)
    try:
        for request in requests:
            client.chat.completions.create(model="bench", messages=[dict(m) for m in request.messages])
    finally:
        client.close()
    return len(requests)


def through_provider(
    server: RemoteServer, requests: list[ChatRequest], concurrency: int, cache: ResponseCache | None = None
) -> int:
    provider = OpenAIProvider(
        "bench",
        api_key_env=KEY_ENV,
        base_url=server.base_url,
        concurrency=concurrency,
        cache=cache,
        log=lambda message: None,
    )
    results = provider.complete_many(requests)
    failed = [r for r in results if not isinstance(r, ChatResponse)]
    assert not failed, f"{len(failed)} requests failed, first: {failed[0]}"
    return len(results)


def row(label: str, timing: Timing, bound: float | None, note: str = "") -> str:
    rate = timing.n / timing.wall
    reached = f"{rate / bound:7.1%}" if bound else f"{'-':>7}"
    bound_text = f"{bound:6.0f}" if bound else f"{'-':>6}"
    return (
        f"  {label:<26} {timing.wall:7.2f} s {rate:8.1f} {bound_text} {reached} {timing.cpu_ms:7.2f}   {note}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per measurement (default 200)")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per answer (default 0.05)")
    parser.add_argument("--concurrency", default="1,4,16,64", help="comma-separated (default 1,4,16,64)")
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats, median reported (default 1)")
    parser.add_argument(
        "--baseline", action=argparse.BooleanOptionalAction, default=True, help="run the sequential baseline"
    )
    opts = parser.parse_args()
    levels = [int(level) for level in opts.concurrency.split(",")]
    os.environ[KEY_ENV] = FAKE_KEY  # a fake key for a local server; it is never printed
    requests = requests_for(opts.requests)
    n, latency = opts.requests, opts.latency

    print(
        f"generation benchmark: Python {platform.python_version()}, openai {openai.__version__}, "
        f"{os.cpu_count()} CPUs; {n} requests, {latency * 1000:g} ms latency each, median of {opts.repeats}"
    )
    print(f"  {'':<26} {'wall':>9} {'req/s':>8} {'bound':>6} {'reached':>7} {'cpu ms':>7}   note")
    started = time.perf_counter()
    server = RemoteServer(latency)
    try:
        if opts.baseline:
            timing = timed(lambda: sequential_baseline(server, requests), opts.repeats)
            print(row("baseline: sequential loop", timing, 1 / latency, "sync openai client, no provider"))
        for level in levels:
            server.reset()
            timing = timed(lambda level=level: through_provider(server, requests, level), opts.repeats)
            note = f"max in flight {server.stats()[1]}"
            print(row(f"provider, concurrency {level}", timing, min(level, n) / latency, note))
        with tempfile.TemporaryDirectory(prefix="harness-bench-") as tmp:
            cache = ResponseCache(Path(tmp) / "llm-responses.sqlite")
            through_provider(server, requests, max(levels), cache)  # fill it
            server.reset()
            timing = timed(lambda: through_provider(server, requests, max(levels), cache), opts.repeats)
            assert server.stats()[0] == 0, "the cached rerun sent requests"
            print(row("provider, cached rerun", timing, None, "0 HTTP requests"))
            cache.close()
    finally:
        server.stop()
    print(f"total benchmark time: {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
