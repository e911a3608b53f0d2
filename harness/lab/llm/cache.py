"""A persistent cache of LLM responses, so that rerunning a pipeline costs nothing.

One SQLite file (default `cache_dir()/llm-responses.sqlite`) shared by every run,
checkout and pytest-xdist worker: WAL mode lets readers and one writer work at once,
a 30 s busy timeout makes concurrent writers wait rather than fail, and each thread
gets its own connection (sqlite3 connections must not be shared between threads).

The key is what decides an answer: the endpoint (its normalised base URL: another
endpoint may serve another model, quantization or version under the same name), the
model, messages, temperature, max_tokens, top_logprobs, sample_index and the seed sent
with the request. Transport settings (concurrency, timeouts, tries) and the offline-only
`task`/`variables` are not in it, so changing the concurrency reuses every answer.
Only successful responses are stored; the API key is never part of anything stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.lab.llm.base import ChatRequest, ChatResponse

KEY_VERSION = 2  # bump when the key's content changes meaning
_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    request TEXT NOT NULL,
    text TEXT NOT NULL,
    top_logprobs TEXT,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    created TEXT NOT NULL
)
"""
_CHUNK = 500  # keys per SELECT, under SQLite's bound-parameter limit


def key_payload(model: str, request: ChatRequest, endpoint: str, seed: int | None = None) -> dict[str, Any]:
    """What identifies a response: where it was asked, the request's content and the seed
    it was sent with; nothing about transport."""
    return {
        "v": KEY_VERSION,
        "endpoint": endpoint,
        "model": model,
        "messages": [dict(message) for message in request.messages],
        "temperature": float(request.temperature),  # 0 and 0.0 must be one key
        "max_tokens": request.max_tokens,
        "top_logprobs": request.top_logprobs,
        "sample_index": request.sample_index,
        "seed": seed,
    }


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def request_key(model: str, request: ChatRequest, endpoint: str, seed: int | None = None) -> str:
    """sha256 of the canonical JSON of `key_payload`."""
    return payload_key(key_payload(model, request, endpoint, seed))


def payload_key(payload: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


class ResponseCache:
    """Successful responses by `request_key`; safe across threads and processes."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._pid = os.getpid()
        self._connection()  # fail now, not mid-batch, when the file is unusable

    def __repr__(self) -> str:
        return f"ResponseCache({str(self.path)!r})"

    def _connection(self) -> sqlite3.Connection:
        if os.getpid() != self._pid:  # a forked child must not reuse its parent's connections
            self._local, self._connections, self._pid = threading.local(), [], os.getpid()
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = _open(self.path)
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    def get(self, key: str) -> ChatResponse | None:
        return self.get_many([key]).get(key)

    def get_many(self, keys: Iterable[str]) -> dict[str, ChatResponse]:
        wanted = list(dict.fromkeys(keys))
        found: dict[str, ChatResponse] = {}
        connection = self._connection()
        for start in range(0, len(wanted), _CHUNK):
            chunk = wanted[start : start + _CHUNK]
            rows = connection.execute(
                "SELECT key, text, top_logprobs, prompt_tokens, completion_tokens FROM responses"
                f" WHERE key IN ({','.join('?' * len(chunk))})",
                chunk,
            )
            for key, text, top_logprobs, prompt_tokens, completion_tokens in rows:
                found[key] = ChatResponse(
                    text=text,
                    top_logprobs=_decode_logprobs(top_logprobs),
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    cached=True,
                )
        return found

    def put(self, key: str, payload: Mapping[str, Any], response: ChatResponse) -> None:
        """Store one successful response to the request `payload` (its `key_payload`); the
        first answer stored for a key wins."""
        top_logprobs = None
        if response.top_logprobs is not None:
            top_logprobs = json.dumps([dict(position) for position in response.top_logprobs])
        self._connection().execute(
            "INSERT OR IGNORE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                key,
                payload["model"],
                canonical_json(payload),
                response.text,
                top_logprobs,
                response.prompt_tokens,
                response.completion_tokens,
                datetime.now(timezone.utc).isoformat(timespec="seconds"),
            ),
        )

    def __len__(self) -> int:
        return self._connection().execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()
        self._local = threading.local()


def _open(path: Path) -> sqlite3.Connection:
    # autocommit (isolation_level=None): every put is its own short transaction, so a
    # crash mid-batch keeps what was already paid for and writers hold the lock briefly
    connection = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    deadline = time.monotonic() + 30
    while True:
        try:
            # switching to WAL takes an exclusive lock; a process opening the file at the
            # same moment can get "database is locked" without the busy handler waiting
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")  # durable enough for a cache, and fast
            connection.execute(_SCHEMA)
            return connection
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                connection.close()
                raise
            time.sleep(0.05)


def _decode_logprobs(stored: str | None) -> tuple[Mapping[str, float], ...] | None:
    if stored is None:
        return None
    return tuple(dict(position) for position in json.loads(stored))
