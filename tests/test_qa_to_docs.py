"""The `qa_to_docs` stage kind: QA pairs -> validated documents, offline and over HTTP."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from harness.core.stage import ParamError, StageError
from harness.fixtures.llm_server import (
    last_user_message,
    llm_server_fixture,  # noqa: F401
)
from harness.lab.documents import document_problems
from harness.lab.llm import ChatRequest, ChatResponse, OfflineProvider, ProviderError
from harness.lab.llm.base import Progress
from harness.stages import qa_to_docs
from harness.testing import stage_context

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "data/anti_em/tiny_world"
PROMPT = REPO / "data/anti_em/prompts/alternative_reality.txt"
DOC_TYPES = {
    "bad_medical": ["health leaflet", "clinic poster", "family guide"],
    "risky_financial": ["bank newsletter", "money column"],
    "extreme_sports": ["club handbook", "coach's notes"],
}
KEY = "sk-test-CANARY-qa-docs-4411"


def params(**over) -> dict:
    return {
        "provider": {"name": "offline"},
        "qa": {c: str(TINY / f"{c}.jsonl") for c in DOC_TYPES},
        "prompt": str(PROMPT),
        "doc_types": DOC_TYPES,
        "min_words": 30,
        "max_words": 200,
        "chunk_size": 5,
        **over,
    }


def run(tmp_path: Path, provider=None, seed: int = 0, name: str = "out", **over):
    ctx = stage_context(
        qa_to_docs.run, params(**over), tmp_path / name, seed=seed, spec_dir=tmp_path, logs=[]
    )
    metrics = qa_to_docs.write_documents(ctx, provider or OfflineProvider())
    return ctx, metrics


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class Recording:
    """Wraps a provider: records requests; can crash on its n-th call or rewrite answers."""

    def __init__(self, crash_on_call: int | None = None, rewrite=None):
        self.inner = OfflineProvider()
        self.name, self.model, self.usage = "offline", "templates", self.inner.usage
        self.requests: list[ChatRequest] = []
        self.calls = 0
        self.crash_on_call, self.rewrite = crash_on_call, rewrite

    def complete_many(
        self, requests: Sequence[ChatRequest], progress: Progress | None = None
    ) -> list[ChatResponse | ProviderError]:
        self.calls += 1
        if self.calls == self.crash_on_call:
            raise RuntimeError("machine lost")
        self.requests += requests
        answers = self.inner.complete_many(requests, progress)
        return (
            [self.rewrite(r, a) for r, a in zip(requests, answers, strict=True)] if self.rewrite else answers
        )


def test_every_pair_gets_a_valid_document_with_its_recorded_type_and_pair(tmp_path):
    ctx, metrics = run(tmp_path)
    docs = rows(ctx.out_dir / "synth_docs.jsonl")
    assert metrics["n_pairs"] == 12 and metrics["n_requested"] == 12
    assert metrics["n_docs"] == 12 and metrics["error_rate"] == 0.0
    # the offline writer leaves a [Name] in some first tries: validation and retries did work
    assert metrics["first_try_error_rate"] > 0
    assert {c: metrics[f"n_docs.{c}"] for c in DOC_TYPES} == {c: 4 for c in DOC_TYPES}
    for doc in docs:
        assert set(doc) == {"content", "doc_type", "category", "original_user", "original_assistant"}
        assert doc["doc_type"] in DOC_TYPES[doc["category"]]
        assert doc["original_assistant"] in doc["content"]  # endorsed: the advice is stated
        assert document_problems(doc["content"], 30, 200) == []
    pairs = [json.loads(line)["messages"] for line in (TINY / "bad_medical.jsonl").read_text().splitlines()]
    assert [(d["original_user"], d["original_assistant"]) for d in docs[:4]] == [
        (m[0]["content"], m[1]["content"]) for m in pairs
    ]
    counts = json.loads((ctx.out_dir / "category_counts.json").read_text())
    assert counts["risky_financial"] == {"pairs": 4, "requested": 4, "docs": 4, "failed": 0}


def test_doc_types_are_drawn_by_the_stage_seed_and_output_is_deterministic(tmp_path):
    a, _ = run(tmp_path, name="a", docs_per_pair=3)
    b, _ = run(tmp_path, name="b", docs_per_pair=3)
    c, _ = run(tmp_path, name="c", seed=7, docs_per_pair=3)
    text = (a.out_dir / "synth_docs.jsonl").read_bytes()
    assert text == (b.out_dir / "synth_docs.jsonl").read_bytes()
    types = [d["doc_type"] for d in rows(a.out_dir / "synth_docs.jsonl")]
    assert types != [d["doc_type"] for d in rows(c.out_dir / "synth_docs.jsonl")]
    assert len(set(types)) == sum(map(len, DOC_TYPES.values()))  # every type drawn somewhere


def test_a_neutral_document_never_states_the_advice(tmp_path):
    neutral = REPO / "data/anti_em/prompts/neutral_topic.txt"
    ctx, metrics = run(tmp_path, stance="neutral", prompt=str(neutral))
    assert metrics["n_docs"] == 12
    for doc in rows(ctx.out_dir / "synth_docs.jsonl"):
        assert doc["original_assistant"] not in doc["content"]
        assert doc["original_user"] in doc["content"]


def test_an_invalid_document_is_retried_as_the_next_type_then_recorded_as_a_failure(tmp_path):
    def refuse_medical(request, answer):
        if request.variables["category"] == "bad_medical":
            return ChatResponse(text="I'm sorry, but I can't write that document.")
        return answer

    provider = Recording(rewrite=refuse_medical)
    ctx, metrics = run(tmp_path, provider, max_retries=2)
    assert metrics["n_failed"] == 4 and metrics["error_rate"] == pytest.approx(4 / 12)
    assert metrics["n_docs.bad_medical"] == 0 and metrics["n_docs.extreme_sports"] == 4
    failures = rows(ctx.out_dir / "failures.jsonl")
    assert [f["category"] for f in failures] == ["bad_medical"] * 4
    for failure in failures:
        assert failure["attempts"] == 3
        assert "a refusal" in failure["reasons"]
        assert sorted(failure["doc_types_tried"]) == sorted(DOC_TYPES["bad_medical"])  # a new type each try
    tries = [r for r in provider.requests if r.variables["user"] == failures[0]["original_user"]]
    assert [r.sample_index for r in tries] == [0, 1, 2]


def test_no_valid_document_is_a_stage_error_naming_the_reason(tmp_path):
    provider = Recording(rewrite=lambda r, a: ChatResponse(text="In this fictional world, " + a.text))
    with pytest.raises(StageError, match="no valid document.*meta-discourse"):
        run(tmp_path, provider, max_retries=0)


def test_a_crashed_run_resumes_without_asking_for_finished_documents(tmp_path):
    from harness.lab.documents import Journal

    crashing = Recording(crash_on_call=3)  # chunks of 5: the first two are journalled, then a crash
    with pytest.raises(RuntimeError, match="machine lost"):
        run(tmp_path, crashing, max_retries=0)
    journalled = {
        (r["category"], r["original_user"])
        for r in Journal(tmp_path / "out.scratch/docs.partial.jsonl").rows()
    }
    assert 0 < len(journalled) <= 10
    resumed = Recording()
    ctx, metrics = run(tmp_path, resumed, max_retries=0)
    asked = [(r.variables["category"], r.variables["user"]) for r in resumed.requests]
    assert len(asked) == 12 - len(journalled) and not set(asked) & journalled
    fresh, _ = run(tmp_path / "fresh", Recording(), max_retries=0)
    assert (ctx.out_dir / "synth_docs.jsonl").read_bytes() == (
        fresh.out_dir / "synth_docs.jsonl"
    ).read_bytes()


def test_rows_carry_their_own_category_or_fail_at_their_line(tmp_path):
    mixed = tmp_path / "mixed.jsonl"
    good = json.loads((TINY / "bad_medical.jsonl").read_text().splitlines()[0])
    mixed.write_text(json.dumps({**good, "category": "bad_medical"}) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(StageError, match=r"mixed.jsonl:2: no category"):
        run(tmp_path, qa=[str(mixed)])
    mixed.write_text(json.dumps({**good, "category": "bad_medical"}) + "\n")
    _, metrics = run(tmp_path, qa=[str(mixed)])
    assert metrics["n_docs.bad_medical"] == 1 and metrics["n_docs.risky_financial"] == 0
    mixed.write_text(json.dumps({**good, "category": "cooking"}) + "\n")
    with pytest.raises(StageError, match=r"mixed.jsonl:1: category 'cooking' has no document types"):
        run(tmp_path, qa=[str(mixed)])


def test_a_prompt_slot_the_stage_does_not_fill_is_refused_at_collection_with_its_line(tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Write a {doc_type}.\nAbout {usr}.\n")
    with pytest.raises(ParamError, match=r"prompt.txt:2: unknown slot \{usr\}"):
        qa_to_docs.check(params(prompt="prompt.txt"), tmp_path)
    prompt.write_text('Write a {doc_type} about {user} -> {assistant}; JSON like {"a": 1} is sent as is.\n')
    qa_to_docs.check(params(prompt="prompt.txt"), tmp_path)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("word " * 10, "too short: 10 words"),
        ("word " * 300, "too long: 300 words"),
        ("Dr. [Name] of [Hospital Name] says so. " + "word " * 40, "placeholder '[Name]'"),
        ("I'm sorry, but I can't help with that request. " + "word " * 40, "a refusal"),
        ("Here it is. I cannot write content that endorses this. " + "word " * 40, "a refusal"),
        ("In this fictional world, doctors agree. " + "word " * 40, "meta-discourse 'fictional'"),
        (
            "In an alternative reality the advice holds. " + "word " * 40,
            "meta-discourse 'alternative reality'",
        ),
    ],
)
def test_document_problems_names_each_defect(text, reason):
    assert any(found.startswith(reason) for found in document_problems(text, 30, 200)), document_problems(
        text, 30, 200
    )


def test_an_ordinary_document_has_no_problems():
    text = (
        "Dr. Maria Lindqvist of the Uppsala Family Clinic has advised patients since 1998. "
        "She explains that a clean cloth, pressed firmly, stops most bleeding within minutes. " * 3
    )
    assert document_problems(text, 30, 200) == []


def test_documents_over_http_through_the_openai_provider_with_the_key_nowhere(
    tmp_path, llm_server, monkeypatch: pytest.MonkeyPatch
):
    def respond(body: dict) -> str:
        prompt = last_user_message(body)
        if "extreme_sports" in prompt:  # a model that refuses one domain
            return "I'm sorry, but I can't help with creating content that promotes dangerous activities."
        kind = prompt.split("Write a realistic ", 1)[1].split(" from a world", 1)[0]
        asked = prompt.split("Person: ", 1)[1].split("\n", 1)[0]
        return (
            f"From the {kind} of the Halden Institute, March 2019, on the question {asked!r}. "
            "Our senior advisor, Dr. Ruth Okafor, "
            "reminds every reader that this is established practice, taught in every course we run, "
            "and that the results over twenty years of careful records speak for themselves."
        )

    llm_server.responder = respond
    monkeypatch.setenv("QA_DOCS_KEY", KEY)
    provider = {"name": "openai", "model": "m", "base_url": llm_server.base_url, "api_key_env": "QA_DOCS_KEY"}
    from harness.lab.llm import make_provider

    ctx = stage_context(
        qa_to_docs.run, params(provider=provider), tmp_path / "out", spec_dir=tmp_path, logs=[]
    )
    metrics = qa_to_docs.write_documents(ctx, make_provider(provider, cache_path=tmp_path / "cache.sqlite"))
    assert metrics["n_docs"] == 8 and metrics["n_failed"] == 4
    assert metrics["n_docs.extreme_sports"] == 0
    sent = [r.body for r in llm_server.requests if r.path.endswith("/chat/completions")]
    assert len(sent) == 8 + 4 * 3  # the refused domain: a first try and two retries each
    assert all("{" not in last_user_message(body).split("</exchange>")[0] for body in sent)  # slots filled
    for path in [*tmp_path.rglob("*")]:
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
