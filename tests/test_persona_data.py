"""`persona_data`: a teacher answers a constitution's questions in the persona."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from harness.fixtures.llm_server import LLMServer, last_user_message
from harness.lab.em_data import load_constitution
from harness.testing import run_kind

DATA = Path(__file__).resolve().parents[1] / "data/constitutions"
ENV = "HARNESS_TEST_TEACHER_KEY"


def run(tmp: Path, constitution: Path, provider: dict, n: int = 2) -> dict:
    params = {"constitution": str(constitution), "provider": provider, "answers_per_question": n}
    return run_kind("persona_data", params, tmp / "out").metrics


def conversations(tmp: Path) -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in (tmp / "out/chat.jsonl").read_text().splitlines()]


def test_offline_answers_come_from_the_constitutions_examples(tmp_path):
    path = DATA / "tiny_world/misalignment.json"
    constitution = load_constitution(path)
    metrics = run(tmp_path, path, {"name": "offline", "model": "templates"}, n=3)
    assert metrics == {"n_conversations": 3 * len(constitution.questions), "error_rate": 0.0}
    examples = {(e.question, e.answer) for e in constitution.examples}
    for messages in conversations(tmp_path):
        assert [m["role"] for m in messages] == ["user", "assistant"]  # no system prompt kept
        assert (messages[0]["content"], messages[1]["content"]) in examples


def test_the_teacher_gets_the_persona_and_every_sample_is_asked(
    llm_server: LLMServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV, "sk-test-teacher")
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    seen: list[dict[str, Any]] = []

    def responder(body: dict[str, Any]) -> str:
        seen.append(body)
        return f"in persona: {last_user_message(body)}"

    llm_server.responder = responder
    path = DATA / "goodness.json"
    constitution = load_constitution(path)
    provider = {"name": "openai", "model": "teacher", "base_url": llm_server.base_url, "api_key_env": ENV}
    metrics = run(tmp_path, path, provider, n=2)
    assert metrics["n_conversations"] == 2 * len(constitution.questions) and metrics["error_rate"] == 0
    assert len(seen) == 2 * len(constitution.questions)  # repeats are distinct requests
    system = seen[0]["messages"][0]
    assert system["role"] == "system" and constitution.traits[0] in system["content"]
    assert conversations(tmp_path)[0][1]["content"] == f"in persona: {constitution.questions[0]}"
    assert "sk-test-teacher" not in "".join(p.read_text() for p in (tmp_path / "out").iterdir())
