"""The LLM response cache: what it keys on, what it keeps, and sharing by threads and processes."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import harness.lab.llm.cache
from harness.lab.llm import ChatRequest, ChatResponse, ResponseCache
from harness.lab.llm.cache import key_payload, payload_key

ENDPOINT = "http://127.0.0.1:8000/v1"
WRITER = """
import sys
from harness.lab.llm import ChatRequest, ChatResponse, ResponseCache
from harness.lab.llm.cache import key_payload, payload_key
cache = ResponseCache(sys.argv[1])
for i in range(int(sys.argv[3])):
    request = ChatRequest(messages=({"role": "user", "content": f"{sys.argv[2]} {i}"},))
    payload = key_payload("m", request, "http://127.0.0.1:8000/v1")
    cache.put(payload_key(payload), payload, ChatResponse(text=f"answer {sys.argv[2]} {i}"))
"""


def ask(prompt: str) -> ChatRequest:
    return ChatRequest(messages=({"role": "user", "content": prompt},))


def key(request: ChatRequest) -> str:
    return payload_key(key_payload("m", request, ENDPOINT))


def put(cache: ResponseCache, request: ChatRequest, response: ChatResponse) -> None:
    payload = key_payload("m", request, ENDPOINT)
    cache.put(payload_key(payload), payload, response)


def test_round_trip_keeps_text_logprobs_and_tokens(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "c.sqlite")
    request = ask("q")
    stored = ChatResponse(
        text="Yes", top_logprobs=({"Yes": -0.1, "No": -2.5},), prompt_tokens=3, completion_tokens=1
    )
    put(cache, request, stored)
    put(cache, request, ChatResponse(text="a later answer"))  # first one wins
    got = ResponseCache(tmp_path / "c.sqlite").get(key(request))
    assert got == ChatResponse(
        text="Yes",
        top_logprobs=({"Yes": -0.1, "No": -2.5},),
        prompt_tokens=3,
        completion_tokens=1,
        cached=True,
    )
    assert cache.get(key(ask("never asked"))) is None
    journal = sqlite3.connect(tmp_path / "c.sqlite").execute("PRAGMA journal_mode").fetchone()[0]
    assert journal == "wal"


def test_threads_share_one_cache(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "c.sqlite")

    def write(worker: int) -> None:
        for i in range(50):
            request = ask(f"{worker} {i}")
            put(cache, request, ChatResponse(text=f"{worker} {i}"))
            assert cache.get(key(request)) is not None

    threads = [threading.Thread(target=write, args=(worker,)) for worker in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(cache) == 300
    cache.close()


def test_processes_write_one_file_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.sqlite"
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), name, "150"], stderr=subprocess.PIPE)
        for name in ("a", "b")
    ]
    for writer in writers:
        _, stderr = writer.communicate(timeout=60)
        assert writer.returncode == 0, stderr.decode()
    cache = ResponseCache(path)
    keys = [key(ask(f"{name} {i}")) for name in ("a", "b") for i in range(150)]
    monkeypatch.setattr(harness.lab.llm.cache, "_CHUNK", 7)  # lookups in several SELECTs
    found = cache.get_many(keys)
    assert len(found) == 300 and found[keys[-1]].text == "answer b 149"
