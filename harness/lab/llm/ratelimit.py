"""Pacing requests to the rate limits an endpoint advertises in OpenAI's `x-ratelimit-*` headers.

OpenAI answers every request with, for requests and for tokens, the limit, what remains
of it and the time until it is whole again (`x-ratelimit-reset-requests: 120ms`, a Go
duration). It describes a limit as a bucket that refills continuously (60 requests a
minute may be enforced as one a second), so the rate at which one refills is
(limit - remaining) / reset, and never below limit / 60 s (the limits are per minute;
the floor also guards against a reset that does not follow the bucket).

`RateLimiter` keeps such a bucket per limit, as this client believes the endpoint holds
it, and makes each request wait before it is sent until both can pay for it: one
request, and its tokens estimated up front (prompt characters / 4 plus a few per
message, plus `max_tokens`, which OpenAI counts before generating, or else the mean
completion seen so far). Paying at send time makes requests in flight count. When an
answer comes back its estimate is replaced by what the endpoint charged (`usage`), and
its headers bring the bucket down to what the endpoint reported, refilled since the
request was sent, less whatever this client sent after it (the endpoint had not seen
those yet). The belief is only ever lowered by headers, never raised: requests answered
out of order make some reports stale, and the local bucket already refills on its own.
The first request goes alone: until it is over, nothing says whether the endpoint limits
or how much of its limit is left (another job may have spent it), and a first wave of
`concurrency` requests into a spent limit would be that many 429s. Safety-tooling sends
a probe request for the same reason; here the probe is a real request. After it, an
endpoint without the headers is not paced at all.

One limiter lives as long as its provider, across batches, on one event loop at a time;
there is no lock because nothing awaits between checking a bucket and paying from it.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

PER_MINUTE = 60.0  # seconds: OpenAI's limits are requests and tokens per minute
PROBE_POLL = 0.02  # seconds between looks, while the first request is out, at whether it is over
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|m|s|us|µs|ns)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
KINDS = ("requests", "tokens")


def parse_duration(text: str) -> float | None:
    """Seconds in a reset header: a Go duration as OpenAI writes them ("1s", "6m0s",
    "120ms", "1h2m3.5s", "250us") or a bare number of seconds; None when neither."""
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION.findall(text)
        if not parts or "".join(number + unit for number, unit in parts) != text:
            return None
        seconds = sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)
    return seconds if seconds >= 0 and seconds != float("inf") else None


@dataclass(frozen=True)
class Advertised:
    """One limit as a response's headers state it."""

    limit: int
    remaining: int
    reset: float  # seconds until the bucket is full again

    @property
    def rate(self) -> float:
        """Units refilled per second."""
        floor = self.limit / PER_MINUTE
        used = self.limit - self.remaining
        return max(floor, used / self.reset) if used > 0 and self.reset > 0 else floor


def advertised(headers: Mapping[str, str], kind: str) -> Advertised | None:
    """The `kind` ("requests" or "tokens") limit in `headers`, None if absent or garbled."""
    limit = headers.get(f"x-ratelimit-limit-{kind}")
    remaining = headers.get(f"x-ratelimit-remaining-{kind}")
    reset = headers.get(f"x-ratelimit-reset-{kind}")
    if limit is None or remaining is None:
        return None
    try:
        stated = Advertised(int(limit), max(0, int(remaining)), parse_duration(reset or "0s") or 0.0)
    except ValueError:
        return None
    return stated if stated.limit > 0 else None


def estimate_prompt_tokens(messages: Sequence[Mapping[str, object]]) -> int:
    """OpenAI's rule of thumb (4 characters a token) plus a few tokens of framing per message."""
    return sum(len(str(message.get("content") or "")) // 4 + 4 for message in messages)


@dataclass
class _Bucket:
    """One limit as this client believes the endpoint holds it."""

    limit: int
    rate: float
    level: float  # what was left at `updated`
    updated: float

    def level_at(self, now: float) -> float:
        return min(self.limit, self.level + (now - self.updated) * self.rate)

    def set_level(self, level: float, now: float) -> None:
        self.level, self.updated = level, now

    def seconds_until(self, amount: float, now: float) -> float:
        """How long until it can pay `amount` (at most a full bucket: more can never fit)."""
        return max(0.0, (min(amount, self.limit) - self.level_at(now)) / self.rate)


@dataclass
class Ticket:
    """One request paid for: when it was sent and the tokens it is believed to cost."""

    sent_at: float
    tokens: float
    max_tokens: int | None
    done: bool = False


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.buckets: dict[str, _Bucket] = {}  # "requests" / "tokens", once advertised
        self._sent: deque[Ticket] = deque()  # in the order sent, from the oldest in flight
        self._probed = False  # a first request is over: the buckets, if any, are known
        self._completions = 0  # answered requests and their completion tokens: the
        self._completion_tokens = 0  # estimate for a request without max_tokens

    def describe(self) -> str:
        """The limits being paced to, in words ('' while none is known)."""
        return ", ".join(f"{bucket.limit} {kind}" for kind, bucket in self.buckets.items())

    async def acquire(self, messages: Sequence[Mapping[str, object]], max_tokens: int | None) -> Ticket:
        """Wait until the known limits can pay for this request, then pay; the ticket must
        go back through `settle` whatever becomes of the request."""
        completion = max_tokens if max_tokens is not None else self._typical_completion()
        tokens = estimate_prompt_tokens(messages) + completion
        cost = {"requests": 1.0, "tokens": float(tokens)}
        while True:
            now = self.clock()
            if not self._probed and self._sent:  # the first request is out: wait for what it says
                wait = PROBE_POLL
            else:
                waits = [bucket.seconds_until(cost[kind], now) for kind, bucket in self.buckets.items()]
                wait = max(waits, default=0.0)
            if wait <= 0:
                break
            await asyncio.sleep(wait)
        for kind, bucket in self.buckets.items():
            bucket.set_level(bucket.level_at(now) - cost[kind], now)
        ticket = Ticket(now, tokens, max_tokens)
        self._sent.append(ticket)
        return ticket

    def settle(
        self, ticket: Ticket, headers: Mapping[str, str] | None, usage: tuple[int, int] | None = None
    ) -> None:
        """The request of `ticket` is over: correct its tokens from `usage` (prompt,
        completion) when it was answered, and lower the buckets to what `headers` report."""
        now = self.clock()
        if usage is not None:
            prompt, completion = usage
            self._completions += 1
            self._completion_tokens += completion
            charged = prompt + (ticket.max_tokens if ticket.max_tokens is not None else completion)
            if "tokens" in self.buckets:
                bucket = self.buckets["tokens"]
                bucket.set_level(bucket.level_at(now) + ticket.tokens - charged, now)
            ticket.tokens = charged
        if headers is not None:
            for kind in KINDS:
                stated = advertised(headers, kind)
                if stated is not None:
                    self._observe(kind, stated, ticket, now)
        ticket.done = self._probed = True
        while self._sent and self._sent[0].done:  # no answer to come is older than these
            self._sent.popleft()

    def _observe(self, kind: str, stated: Advertised, ticket: Ticket, now: float) -> None:
        position = next(i for i, sent in enumerate(self._sent) if sent is ticket)
        later = list(self._sent)[position + 1 :]
        sent_since = len(later) if kind == "requests" else sum(t.tokens for t in later)
        refilled = min(stated.limit, stated.remaining + (now - ticket.sent_at) * stated.rate)
        reported = refilled - sent_since
        bucket = self.buckets.get(kind)
        if bucket is None:
            self.buckets[kind] = _Bucket(stated.limit, stated.rate, reported, now)
        else:
            bucket.limit, bucket.rate = stated.limit, stated.rate
            bucket.set_level(min(bucket.level_at(now), reported), now)

    def _typical_completion(self) -> int:
        return round(self._completion_tokens / self._completions) if self._completions else 16
