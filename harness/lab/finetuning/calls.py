"""Every call to a fine-tuning API, retried the same way whichever provider's client makes it.

Both official clients (OpenAI's and Together's) raise the same shapes of error: a status
error with the HTTP response, a connection error, a timeout. `Calls.run` retries 408, 409,
429 and 5xx, timeouts, connection errors and bodies that do not parse, waiting a jittered
exponential backoff, at least as long as a Retry-After header asks (at most RETRY_AFTER_CAP
seconds), and gives up after `max_tries` tries. Anything else (another 4xx, a request the
client itself refuses) fails at once. Either way the caller gets one `ProviderCallError`,
raised outside the client's exception, so no traceback passes through the client's frames
(which hold the request's headers, the key among them), and its message is scrubbed of the
key. `recover`, given for a call that must not be repeated blindly (creating a paid job),
runs before each retry and returns what the failed try achieved after all, if anything.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

from harness.core.stage import StageError

T = TypeVar("T")
RETRIED_STATUSES = frozenset({408, 409, 429})  # and every 5xx
RETRY_AFTER_CAP = 120.0  # a Retry-After of an hour is not waited out
BACKOFF_BASE, BACKOFF_CAP = 0.5, 30.0
MESSAGE_LIMIT = 500  # characters of an endpoint's error message worth repeating


class ProviderCallError(StageError):
    """A call to the fine-tuning API that failed for good: its message alone is shown."""


@dataclass(frozen=True)
class _Failure:
    message: str
    retried: bool
    retry_after: float | None = None


class Calls:
    """Runs one client's calls: `sdk` is the client's package (openai or together), `client`
    the client holding the key, `key_env` the variable it came from (named in messages)."""

    def __init__(
        self,
        provider: str,
        sdk: ModuleType,
        client: Any,
        key_env: str,
        max_tries: int,
        log: Callable[[str], None],
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.provider = provider
        self.sdk = sdk
        self.client = client
        self.key_env = key_env
        self.max_tries = max_tries
        self.log = log
        self.sleep = sleep
        self._random = random.Random()  # jitter must not consume the global `random` a stage seeds

    def run(self, what: str, call: Callable[[], T], recover: Callable[[], T | None] | None = None) -> T:
        """`call()`, retried as the module says; `what` names it in messages ("upload the data")."""
        failure = _Failure("no try made", retried=True)
        for attempt in range(1, self.max_tries + 1):
            if attempt > 1 and recover is not None:
                found = self.run(f"{what}: check whether the failed try took effect", recover)
                if found is not None:
                    return found
            try:
                return call()
            except Exception as error:  # turned into a message here, raised outside this block
                failure = self._failure(error)
            if not failure.retried:
                raise ProviderCallError(self.scrub(f"{self.provider}: {what} failed: {failure.message}"))
            if attempt < self.max_tries:
                delay = self._delay(attempt, failure.retry_after)
                self.log(
                    self.scrub(
                        f"{self.provider}: {what}: {failure.message}; try {attempt + 1} in {delay:.1f} s"
                    )
                )
                self.sleep(delay)
        last = f"{self.provider}: {what} failed after {self.max_tries} tries; last: {failure.message}"
        raise ProviderCallError(self.scrub(last))

    def scrub(self, text: str) -> str:
        """`text` without the key, writable as UTF-8."""
        text = text.replace(self.client.api_key, "[redacted]")
        return text.encode("utf-8", "backslashreplace").decode("utf-8")

    def _failure(self, error: Exception) -> _Failure:
        sdk = self.sdk
        if isinstance(error, sdk.APIStatusError):
            status = error.status_code
            detail = _detail(error)
            if status in (401, 403):
                return _Failure(
                    f"the endpoint rejected the API key in the environment variable {self.key_env} "
                    f"(HTTP {status}: {detail})",
                    retried=False,
                )
            retried = status in RETRIED_STATUSES or status >= 500
            # imported here: that module imports openai, which collection need not load
            from harness.lab.llm.openai_provider import retry_after_seconds

            return _Failure(f"HTTP {status}: {detail}", retried, retry_after_seconds(error.response.headers))
        if isinstance(error, sdk.APITimeoutError):
            return _Failure("timed out", retried=True)
        if isinstance(error, sdk.APIConnectionError):
            return _Failure(f"connection error: {error.__cause__ or error}", retried=True)
        if isinstance(error, (json.JSONDecodeError, sdk.APIResponseValidationError)):
            return _Failure(f"malformed response: {error}", retried=True)
        return _Failure(f"{type(error).__name__}: {_clip(str(error))}", retried=False)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Full jitter, at least Retry-After (capped): the rule of the `openai` chat provider."""
        backoff = self._random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1)))
        return backoff if retry_after is None else max(backoff, min(retry_after, RETRY_AFTER_CAP))


def _detail(error: Any) -> str:
    """The endpoint's own message in an error body, else the client's."""
    body = error.body
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, Mapping) else inner
        return _clip(str(message or body))
    return _clip(str(body or error.message))


def _clip(text: str) -> str:
    return text if len(text) <= MESSAGE_LIMIT else text[:MESSAGE_LIMIT] + "..."
