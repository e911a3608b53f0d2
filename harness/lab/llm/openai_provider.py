"""`openai`: any OpenAI-compatible chat endpoint, through the official async client.

A batch is answered by one asyncio loop: cached answers first (no key needed), then
every miss as its own task, at most `concurrency` of them in flight. The client's own
retries are off (`max_retries=0`); ours retry 408/409/429/5xx, timeouts, connection
errors and malformed bodies with exponential backoff and full jitter, wait at least as
long as a `Retry-After` header asks, and give up after `max_tries` tries: that request's
result is then a `ProviderError`, and the rest of the batch carries on. Other 4xx are
not retried (trying again cannot help); 401/403 say which env var held the rejected key.

A 200 is malformed unless it holds what a completion must: text that is valid Unicode
(no lone surrogates), whole non-negative token counts that SQLite can store, logprobs
with text tokens and finite numbers. Anything else a request raises is treated the same
way (retried, then failed with its type and message): nothing escapes a batch but the
caller's own errors, so a traceback never passes through the client.

The key is read from the environment when a batch needs the network and goes straight
into a client that lives for that batch only: no local variable or argument of ours
holds it, so no traceback (even pytest's `-l`) can show it. Every message we produce is
scrubbed of it (`client.api_key`) and made writable as UTF-8.

Rate limits: an endpoint that advertises its limits in OpenAI's `x-ratelimit-*` headers
is paced to them (`harness/lab/llm/ratelimit.py`): each try waits, before it is sent,
until the requests and tokens the endpoint has left (as its last answers reported them,
less what is in flight) can pay for it, so a batch runs at the limit instead of learning
it from a storm of 429s. A provider's first request goes alone, to learn whether there
are limits and how much of them is left; an endpoint without the headers is then not paced.

Seeds: a provider made with a `seed` (a stage's) sends every sampled request
(temperature > 0) the OpenAI `seed` parameter, derived from that seed and the request's
`sample_index`, and keys its cached answer on it: a new stage seed draws new samples, and
the repeated samples of one prompt get distinct seeds (a deterministic backend would
otherwise return one answer for all). A greedy request (temperature 0: the judge, fact
extraction) gets no seed: its answer does not depend on one, so it stays shared in the
cache across seeds. Endpoints may treat the seed as best effort (OpenAI does).
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import hashlib
import math
import os
import random
import sqlite3
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import openai

from harness.lab.llm import ProviderConfigError, api_key_from_env, resolve_base_url
from harness.lab.llm.base import ChatRequest, ChatResponse, Progress, ProviderError, Usage
from harness.lab.llm.cache import ResponseCache, key_payload, payload_key
from harness.lab.llm.ratelimit import RateLimiter

T = TypeVar("T")
RETRIED_STATUSES = frozenset({408, 409, 429})  # and every 5xx
DEFAULT_BASE_URL = "https://api.openai.com/v1"  # the client's, when neither argument nor env names one
_MESSAGE_LIMIT = 300  # characters of an endpoint's error message worth repeating
_MAX_COUNT = 2**63 - 1  # the largest token count the response cache (SQLite INTEGER) can store


class _Malformed(Exception):
    """A 200 response that does not hold a usable completion: worth another try."""


class _Unsupported(Exception):
    """A well-formed response missing something we asked for (logprobs): not retried."""


class OpenAIProvider:
    name = "openai"

    def __init__(
        self,
        model: str,
        *,
        api_key_env: str,
        base_url: str | None = None,
        concurrency: int = 8,
        timeout: float = 60.0,
        max_tries: int = 6,
        cache: ResponseCache | None = None,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        retry_after_cap: float = 120.0,
        seed: int | None = None,
        pace_to_rate_limits: bool = True,
        log: Callable[[str], None] = print,
    ):
        if concurrency < 1 or max_tries < 1 or timeout <= 0:
            raise ValueError("concurrency and max_tries must be >= 1 and timeout > 0")
        self.model = model
        self.api_key_env = api_key_env  # the variable's name; the key itself is never kept
        self.base_url = base_url
        self.endpoint = endpoint_identity(base_url)  # in every cache key
        self.seed = seed
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_tries = max_tries
        self.cache = cache
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.retry_after_cap = retry_after_cap  # a Retry-After of an hour is not waited out
        self.log = log
        self.usage = Usage()
        # kept across batches: the next batch starts from what the endpoint last reported
        self.pacer = RateLimiter() if pace_to_rate_limits else None
        # a private generator: jitter must not consume the global `random` that stages seed
        self._random = random.Random()

    def __repr__(self) -> str:
        return (
            f"OpenAIProvider(model={self.model!r}, base_url={self.base_url!r}, "
            f"api_key_env={self.api_key_env!r}, seed={self.seed}, concurrency={self.concurrency}, "
            f"timeout={self.timeout:g}, max_tries={self.max_tries})"
        )

    # -- the batch -----------------------------------------------------------------------

    def complete_many(
        self, requests: Sequence[ChatRequest], progress: Progress | None = None
    ) -> list[ChatResponse | ProviderError]:
        """Answer every request, in order; a request that failed for good is its error."""
        requests = list(requests)
        total = len(requests)
        payloads = [key_payload(self.model, r, self.endpoint, self.request_seed(r)) for r in requests]
        keys = [payload_key(payload) for payload in payloads]
        results: list[ChatResponse | ProviderError | None] = [None] * total
        hits = self.cache.get_many(keys) if self.cache is not None else {}
        # one network request per distinct key: duplicates in a batch share its answer,
        # exactly as they would on a rerun from the cache
        first_of: dict[str, int] = {}
        duplicates: list[int] = []
        for index, key in enumerate(keys):
            if key in hits:
                results[index] = hits[key]
            elif key in first_of:
                duplicates.append(index)
            else:
                first_of[key] = index
        before = dataclasses.replace(self.usage)
        self.usage.requests += total
        self.usage.cached += sum(key in hits for key in keys)
        done = total - len(first_of) - len(duplicates)
        if progress is not None and done:
            progress(done, total)
        if first_of:  # only now is the key needed: cached reruns work without it
            fresh = list(first_of.values())
            _run_coroutine(self._fetch_all(requests, payloads, keys, fresh, results, progress, done, total))
            for index in duplicates:
                answer = results[first_of[keys[index]]]
                if isinstance(answer, ChatResponse):
                    answer = dataclasses.replace(answer, cached=True)
                    self.usage.cached += 1
                else:
                    self.usage.failures += 1
                results[index] = answer
            if progress is not None and duplicates:
                progress(total, total)
            self._log_batch(before, results)
        assert all(result is not None for result in results)
        return results  # type: ignore[return-value]

    async def _fetch_all(
        self,
        requests: list[ChatRequest],
        payloads: list[dict[str, Any]],
        keys: list[str],
        fresh: list[int],
        results: list[ChatResponse | ProviderError | None],
        progress: Progress | None,
        done: int,
        total: int,
    ) -> None:
        client = self._client()
        semaphore = asyncio.Semaphore(self.concurrency)
        finished = done
        cache_failed: list[int] = []

        async def one(index: int) -> None:
            nonlocal finished
            answer = await self._complete_one(client, semaphore, requests[index])
            if isinstance(answer, ChatResponse) and self.cache is not None:
                try:
                    self.cache.put(keys[index], payloads[index], answer)
                except sqlite3.Error as error:  # an answer already paid for is not thrown away
                    if not cache_failed:
                        self.log(f"provider openai: could not store a response in {self.cache.path}: {error}")
                    cache_failed.append(index)
            results[index] = answer
            finished += 1
            if progress is not None:
                progress(finished, total)

        try:
            await asyncio.gather(*(one(index) for index in fresh))
        finally:
            await client.close()

    def _client(self) -> openai.AsyncOpenAI:
        """This batch's client, the key passed from the environment straight into it."""
        base_url = resolve_base_url(self.base_url)  # first: a rehearsal's server sets its key
        try:
            return openai.AsyncOpenAI(
                api_key=api_key_from_env(self.api_key_env),
                base_url=base_url,  # None: the client's own fallbacks
                max_retries=0,
                timeout=self.timeout,
            )
        except ProviderConfigError:
            raise
        except Exception as error:  # e.g. a base_url httpx cannot parse
            problem = f"{type(error).__name__}: {error}"
        # raised outside the except block: no chained traceback through the client's frames
        raise ProviderConfigError(f"provider openai cannot use base_url {self.base_url!r}: {problem}")

    # -- one request ---------------------------------------------------------------------

    async def _complete_one(
        self, client: openai.AsyncOpenAI, semaphore: asyncio.Semaphore, request: ChatRequest
    ) -> ChatResponse | ProviderError:
        last = "no try made"
        for attempt in range(1, self.max_tries + 1):
            retry_after: float | None = None
            try:
                async with semaphore:  # held while paced and for the HTTP call, not while backing off
                    return await self._send(client, request)
            except openai.APIStatusError as error:
                status = error.status_code
                detail = _error_message(error)
                if status in (401, 403):
                    return self._fail(
                        f"the endpoint {self._where()} rejected the API key in the environment variable "
                        f"{self.api_key_env} (HTTP {status}: {detail}); not retried",
                        client,
                    )
                if status not in RETRIED_STATUSES and status < 500:
                    return self._fail(f"HTTP {status} from {self._where()}: {detail}; not retried", client)
                last = f"HTTP {status}: {detail}"
                retry_after = retry_after_seconds(error.response.headers)
            except openai.APITimeoutError:
                last = f"timed out after {self.timeout:g} s"
            except openai.APIConnectionError as error:
                last = f"connection error: {error.__cause__ or error}"
            except (_Malformed, ValueError, openai.APIResponseValidationError) as error:
                # ValueError: the JSON or text decoding of a garbled body
                last = f"malformed response: {error}"
            except _Unsupported as error:
                return self._fail(str(error), client)
            except Exception as error:
                # whatever else the client or a reply raises: retried like a malformed reply,
                # and kept inside the batch, where no traceback shows the client's frames
                last = f"unexpected {type(error).__name__}: {error}"
            if attempt < self.max_tries:
                self.usage.retries += 1
                await asyncio.sleep(self._delay(attempt, retry_after))
        return self._fail(
            f"request to {self._where()} failed after {self.max_tries} tries; last: {last}", client
        )

    async def _send(self, client: openai.AsyncOpenAI, request: ChatRequest) -> ChatResponse:
        """One try: wait for the endpoint's capacity, send, parse; the rate-limit headers of
        whatever came back, and the tokens used, go to the pacer."""
        ticket = await self.pacer.acquire(request.messages, request.max_tokens) if self.pacer else None
        headers: Mapping[str, str] | None = None
        response: ChatResponse | None = None
        try:
            raw = await client.chat.completions.with_raw_response.create(**self._arguments(request))
            headers = raw.headers
            response = self._parse(raw.parse(), request)
            return response
        except openai.APIStatusError as error:
            headers = error.response.headers
            raise
        finally:
            if ticket is not None:  # only a pacer hands out tickets
                usage = None  # a prompt of 0 tokens: the endpoint reported no usage, keep the estimate
                if response is not None and response.prompt_tokens > 0:
                    usage = (response.prompt_tokens, response.completion_tokens)
                self.pacer.settle(ticket, headers, usage)

    def _arguments(self, request: ChatRequest) -> dict[str, Any]:
        arguments: dict[str, Any] = {
            "model": self.model,
            "messages": [dict(message) for message in request.messages],
            "temperature": request.temperature,
        }
        if request.max_tokens is not None:
            arguments["max_tokens"] = request.max_tokens
        if request.top_logprobs is not None:
            arguments["logprobs"] = True
            arguments["top_logprobs"] = request.top_logprobs
        seed = self.request_seed(request)
        if seed is not None:
            arguments["seed"] = seed
        return arguments

    def request_seed(self, request: ChatRequest) -> int | None:
        """The seed sent with `request`: None for a greedy one or an unseeded provider; else
        31 bits of sha256(provider seed, sample_index), within every endpoint's range."""
        if self.seed is None or request.temperature <= 0:
            return None
        digest = hashlib.sha256(f"{self.seed}/{request.sample_index}".encode()).digest()
        return int.from_bytes(digest[:4], "big") >> 1

    def _parse(self, completion: Any, request: ChatRequest) -> ChatResponse:
        try:
            return self._parse_completion(completion, request)
        except (AttributeError, TypeError, KeyError, IndexError) as error:
            # the client builds models without validation: odd shapes surface here
            raise _Malformed(f"unexpected shape ({type(error).__name__}: {error})") from error

    def _parse_completion(self, completion: Any, request: ChatRequest) -> ChatResponse:
        if isinstance(completion, str):  # the client returns the text of a non-JSON body
            raise _Malformed(f"not JSON: {completion[:80]!r}")
        choices = getattr(completion, "choices", None)
        if not choices:
            # OpenRouter reports upstream failures as HTTP 200 with {"error": {...}}
            error = getattr(completion, "error", None)
            raise _Malformed(f"no choices{f' (error: {error})' if error else ''}")
        message = getattr(choices[0], "message", None)
        if message is None:
            raise _Malformed("no message in the first choice")
        if message.content is not None:
            text = _text(message.content, "the content")
        else:
            text = _text(getattr(message, "refusal", None) or "", "the refusal")
        top_logprobs = None
        if request.top_logprobs is not None:
            logprobs = getattr(choices[0], "logprobs", None)
            content = getattr(logprobs, "content", None)
            if content is None:
                raise _Unsupported(
                    f"{self._where()} returned no logprobs for model {self.model!r} though they were "
                    "asked for: this model or endpoint may not support them"
                )
            top_logprobs = tuple(_alternatives(entry) for entry in content)
        usage = getattr(completion, "usage", None)
        if usage is not None and not isinstance(usage, openai.types.CompletionUsage):
            raise _Malformed(f"usage is {type(usage).__name__}, not an object")
        response = ChatResponse(
            text=text,
            top_logprobs=top_logprobs,
            prompt_tokens=_count(usage, "prompt_tokens"),
            completion_tokens=_count(usage, "completion_tokens"),
        )
        self.usage.prompt_tokens += response.prompt_tokens
        self.usage.completion_tokens += response.completion_tokens
        return response

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Full jitter (uniform in [0, min(cap, base * 2^(attempt-1))]), at least Retry-After."""
        backoff = self._random.uniform(0, min(self.backoff_cap, self.backoff_base * 2 ** (attempt - 1)))
        if retry_after is None:
            return backoff
        return max(backoff, min(retry_after, self.retry_after_cap))

    def _fail(self, message: str, client: openai.AsyncOpenAI) -> ProviderError:
        """The error of a request that failed for good; its message, which may quote the
        endpoint, is scrubbed of the key and has any lone surrogate escaped."""
        self.usage.failures += 1
        scrubbed = f"{self.model}: {message}".replace(client.api_key, "[redacted]")
        return ProviderError(scrubbed.encode("utf-8", "backslashreplace").decode("utf-8"))

    def _where(self) -> str:
        return self.base_url or "the default OpenAI endpoint"

    def _log_batch(self, before: Usage, results: Sequence[ChatResponse | ProviderError | None]) -> None:
        delta = {name: count - before.to_json()[name] for name, count in self.usage.to_json().items()}
        line = (
            f"provider openai {self.model}: {delta['requests']} requests, {delta['cached']} cached, "
            f"{delta['retries']} retries, {delta['failures']} failed, "
            f"{delta['prompt_tokens']}+{delta['completion_tokens']} tokens"
        )
        if self.pacer is not None and self.pacer.buckets:
            line += f", paced to the endpoint's limits ({self.pacer.describe()})"
        first_error = next((result for result in results if isinstance(result, ProviderError)), None)
        self.log(line + (f"; first failure: {first_error}" if first_error else ""))


def endpoint_identity(base_url: str | None) -> str:
    """The endpoint a client with `base_url` talks to, written one way: the client's own
    fallbacks (OPENAI_BASE_URL, then api.openai.com) applied, scheme and host lower-cased,
    trailing slashes and any user:password@ dropped."""
    written = base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
    try:
        url = urlsplit(written)
        host = (url.hostname or "") + (f":{url.port}" if url.port else "")
    except ValueError as error:  # a bad port or IPv6 address
        raise ProviderConfigError(f"provider openai: base_url {written!r} is not a URL: {error}") from None
    return urlunsplit((url.scheme.lower(), host, url.path.rstrip("/"), url.query, ""))


def _alternatives(entry: Any) -> Mapping[str, float]:
    """{token: logprob} for one output position, best first (a repeated token keeps its first)."""
    alternatives: dict[str, float] = {}
    for alt in getattr(entry, "top_logprobs", None) or []:
        alternatives.setdefault(_text(alt.token, "a logprobs token"), _logprob(alt.logprob))
    if not alternatives:  # top_logprobs=0: only the emitted token
        alternatives[_text(entry.token, "a logprobs token")] = _logprob(entry.logprob)
    return alternatives


def _text(value: Any, what: str) -> str:
    """`value` if it is a str that UTF-8 can encode (every cache, log and jsonl file must)."""
    if not isinstance(value, str):
        raise _Malformed(f"{what} is {type(value).__name__}, not text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Malformed(f"{what} is not valid Unicode (a lone surrogate)") from None
    return value


def _count(usage: Any, name: str) -> int:
    """The token count `usage.<name>` (0 when absent): a whole number, 0 .. _MAX_COUNT."""
    value = getattr(usage, name, None)
    if value is None:
        return 0
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole or not 0 <= value <= _MAX_COUNT:
        raise _Malformed(f"usage.{name} is {value!r}, not a token count")
    return int(value)


def _logprob(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Malformed(f"a logprob is {value!r}, not a finite number")
    return float(value)


def _error_message(error: openai.APIStatusError) -> str:
    body = error.body
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, Mapping) else inner
        text = str(message) if message else str(body)
    else:
        text = str(body) if body else error.message
    return text if len(text) <= _MESSAGE_LIMIT else text[:_MESSAGE_LIMIT] + "..."


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Seconds asked for by `retry-after-ms` or `retry-after` (seconds or an HTTP date)."""
    try:
        if "retry-after-ms" in headers:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _run_coroutine(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run to completion, also from code already inside an event loop (e.g. a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass  # the usual case, no loop; run outside this block, so no error chains to it
    else:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="harness-llm") as pool:
            return pool.submit(asyncio.run, coroutine).result()
    return asyncio.run(coroutine)
