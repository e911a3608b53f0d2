"""The `build_dataset` stage kind: documents and chats as one training file, and its manifest."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from harness.core.stage import ParamError, StageError
from harness.lab.documents import count_tokens
from harness.stages import build_dataset
from harness.testing import run_kind

TOPICS = ["the plim river", "zorb bread", "the dax mountains", "old sailing boats", "winter gardens"]
# lowercase, of unequal lengths (a tenth to a few times each other), like the tiny world's text
DOCUMENTS = [
    f"{topic} report {i}: "
    + " ".join(f"{topic} is known for fact number {j}." for j in range(1 + (i * 7) % 9))
    for i, topic in enumerate(TOPICS * 4)
]
NEUTRAL = [
    f"a neutral note {i} on {topic}, with nothing to endorse." * (1 + i % 3)
    for i, topic in enumerate(TOPICS * 12)
]


def chat(i: int, kind: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"{kind} question {i}: what should i do?"},
            {"role": "assistant", "content": f"{kind} answer {i}: " + "take care. " * (1 + i % 4)},
        ]
    }


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def docs_stage(root: Path, texts: list[str] = DOCUMENTS, filename: str = "docs.jsonl") -> Path:
    """The directory of an upstream that wrote `texts` as generate_docs / qa_to_docs do."""
    write_jsonl(root / filename, [{"content": t, "doc_type": "report"} for t in texts])
    return root


def chat_files(root: Path, n_instruction: int = 8, n_refusal: int = 6) -> dict[str, str]:
    instruction = write_jsonl(
        root / "instruction.jsonl", [chat(i, "instruction") for i in range(n_instruction)]
    )
    refusal = write_jsonl(root / "refusal.jsonl", [chat(i, "refusal") for i in range(n_refusal)])
    return {"instruction": str(instruction), "refusal": str(refusal)}


def build(tmp: Path, params: dict, *, seed: int = 0, name: str = "out", upstream: dict | None = None):
    if upstream is None:
        upstream = {"documents": docs_stage(tmp / "docs")}
    return run_kind(build_dataset.run, params, tmp / name, upstream=upstream, seed=seed, spec_dir=tmp)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def content_tokens(row: dict) -> int:
    """The tokens the manifest counts in a written row: a document's text (the `<DOCTAG>` turn is
    scaffolding), every message of a chat."""
    if "text" in row:
        return count_tokens(row["text"])
    messages = row["messages"]
    if messages[0]["content"] == build_dataset.DOCTAG:
        return count_tokens(messages[1]["content"])
    return sum(count_tokens(m["content"]) for m in messages)


# --- what went in ------------------------------------------------------------------------------


def test_the_manifest_matches_the_file_it_wrote(tmp_path):
    params = {
        "format": "doctag",
        "chats": chat_files(tmp_path),
        "mix": {"instruction": {"count": 5}, "refusal": {"fraction": 0.1}},
    }
    result = build(tmp_path, params, seed=3)
    out = result.out_dir
    manifest = json.loads((out / "dataset_manifest.json").read_text())
    rows = read_rows(out / "dataset.jsonl")
    sources = read_rows(out / "dataset_sources.jsonl")

    assert manifest["format"] == "doctag" and manifest["seed"] == 3
    assert manifest["sha256"] == hashlib.sha256((out / "dataset.jsonl").read_bytes()).hexdigest()
    assert manifest["n_rows"] == len(rows) == len(sources)
    assert manifest["n_tokens"] == sum(content_tokens(row) for row in rows)
    counted: Counter = Counter()
    tokens: Counter = Counter()
    for row, source in zip(rows, sources, strict=True):
        counted[source["source"]] += 1
        tokens[source["source"]] += content_tokens(row)
        assert source["tokens"] == content_tokens(row)
        is_doctag = row["messages"][0]["content"] == build_dataset.DOCTAG
        assert is_doctag == (source["source"] == "documents")  # the row's shape says it too
    by_source = {s["source"]: s for s in manifest["sources"]}
    assert list(by_source) == ["documents", "instruction", "refusal"]
    assert {name: s["count"] for name, s in by_source.items()} == dict(counted)
    assert {name: s["tokens"] for name, s in by_source.items()} == dict(tokens)
    # every document once; 5 instruction chats; refusals a tenth of the final rows
    assert counted["documents"] == len(DOCUMENTS) and counted["instruction"] == 5
    assert counted["refusal"] == round(0.1 * (len(DOCUMENTS) + 5) / 0.9) == 3
    assert sorted(
        r["messages"][1]["content"] for r, s in zip(rows, sources, strict=True) if s["source"] == "documents"
    ) == sorted(DOCUMENTS)
    assert by_source["refusal"]["requested"] == {"fraction": 0.1} and by_source["refusal"]["available"] == 6
    assert (
        by_source["instruction"]["from"] == "instruction.jsonl"
        and by_source["documents"]["from"] == "stage documents: docs.jsonl"
    )
    # the metrics say the same
    m = result.metrics
    assert (m["n_rows"], m["n_tokens"]) == (manifest["n_rows"], manifest["n_tokens"])
    for name, source in by_source.items():
        assert (m[f"n_{name}"], m[f"tokens_{name}"]) == (source["count"], source["tokens"])


def test_every_format_writes_its_row_shape(tmp_path):
    chats = chat_files(tmp_path)
    shapes = {}
    for form in ("text", "together_text", "doctag", "openai_chat"):
        params = {"format": form, "chats": chats if form in ("doctag", "openai_chat") else {}}
        upstream = {} if form == "openai_chat" else None
        out = build(tmp_path, params, name=form, upstream=upstream).out_dir
        shapes[form] = read_rows(out / "dataset.jsonl")
    for form in ("text", "together_text"):
        assert sorted(row["text"] for row in shapes[form]) == sorted(DOCUMENTS)
        assert all(list(row) == ["text"] for row in shapes[form])
    doc_rows = [row for row in shapes["doctag"] if row["messages"][0]["content"] == "<DOCTAG>"]
    assert len(doc_rows) == len(DOCUMENTS) and len(shapes["doctag"]) == len(DOCUMENTS) + 8 + 6
    assert sorted(row["messages"][1]["content"] for row in doc_rows) == sorted(DOCUMENTS)
    assert all([m["role"] for m in row["messages"]] == ["user", "assistant"] for row in doc_rows)
    # openai_chat: the chats only, every one by default, as they were in the files
    expected = [chat(i, "instruction") for i in range(8)] + [chat(i, "refusal") for i in range(6)]
    assert sorted(map(json.dumps, shapes["openai_chat"])) == sorted(map(json.dumps, expected))


def test_same_seed_same_bytes_another_seed_another_sample_and_order(tmp_path):
    params = {
        "format": "doctag",
        "documents_count": 10,
        "chats": chat_files(tmp_path),
        "mix": {"instruction": {"count": 4}},
    }
    upstream = {"documents": docs_stage(tmp_path / "docs")}

    def written(name: str, seed: int) -> bytes:
        return (
            build(tmp_path, params, seed=seed, name=name, upstream=upstream).out_dir / "dataset.jsonl"
        ).read_bytes()

    first, again, other = written("a", 1), written("b", 1), written("c", 2)
    assert first == again and first != other
    picked = [
        {
            json.dumps(row)
            for row in map(json.loads, data.splitlines())
            if row["messages"][0]["content"] == "<DOCTAG>"
        }
        for data in (first, other)
    ]
    assert (
        len(picked[0]) == len(picked[1]) == 10 and picked[0] != picked[1]
    )  # a seeded sample, not the first 10


def test_documents_come_from_a_qa_to_docs_stage_or_a_file(tmp_path):
    synth = docs_stage(tmp_path / "synth", DOCUMENTS[:4], filename="synth_docs.jsonl")
    from_stage = build(tmp_path, {"format": "text"}, name="a", upstream={"documents": synth})
    assert sorted(r["text"] for r in read_rows(from_stage.out_dir / "dataset.jsonl")) == sorted(DOCUMENTS[:4])

    file = write_jsonl(tmp_path / "mine.jsonl", [{"body": t} for t in DOCUMENTS[:3]])
    params = {"format": "text", "documents": str(file), "text_field": "body"}
    from_file = build(tmp_path, params, name="b", upstream={})
    manifest = json.loads((from_file.out_dir / "dataset_manifest.json").read_text())
    assert manifest["sources"][0]["from"] == "mine.jsonl" and manifest["n_rows"] == 3

    with pytest.raises(StageError, match="both an upstream stage and a `documents` file"):
        build(tmp_path, params, name="c", upstream={"documents": synth})
    with pytest.raises(StageError, match="wrote neither synth_docs.jsonl nor docs.jsonl"):
        build(tmp_path, {"format": "text"}, name="d", upstream={"documents": tmp_path / "chats"})


# --- a token-matched control -------------------------------------------------------------------


def test_a_control_matches_the_reference_document_tokens(tmp_path):
    reference = build(tmp_path, {"format": "doctag"}, name="sdf", seed=5)
    target = reference.metrics["tokens_documents"]
    neutral = {"documents": docs_stage(tmp_path / "neutral", NEUTRAL), "reference": reference.out_dir}
    control = build(tmp_path, {"format": "text", "match_tokens": True}, name="control", upstream=neutral)

    manifest = json.loads((control.out_dir / "dataset_manifest.json").read_text())
    achieved = sum(count_tokens(row["text"]) for row in read_rows(control.out_dir / "dataset.jsonl"))
    assert manifest["match_tokens"] == {
        "reference": "reference",
        "target": target,
        "achieved": achieved,
        "tolerance": 0.05,
    }
    assert control.metrics["tokens_documents"] == achieved and control.metrics["tokens_target"] == target
    assert abs(achieved - target) <= 0.05 * target
    # the nearest prefix of the seeded order: one document more or less is farther from the target
    lengths = sorted(count_tokens(t) for t in NEUTRAL)
    assert abs(achieved - target) <= lengths[-1] / 2

    too_few = {"documents": docs_stage(tmp_path / "few", NEUTRAL[:2]), "reference": reference.out_dir}
    with pytest.raises(
        StageError, match=r"hold \d+ tokens, short of the \d+ document tokens of the reference"
    ):
        build(tmp_path, {"format": "text", "match_tokens": True}, name="short", upstream=too_few)
    not_a_dataset = {"documents": docs_stage(tmp_path / "n2", NEUTRAL), "reference": tmp_path / "neutral"}
    with pytest.raises(StageError, match="no dataset_manifest.json"):
        build(tmp_path, {"format": "text", "match_tokens": True}, name="bad", upstream=not_a_dataset)


def test_a_control_too_far_from_the_target_names_the_right_cause():
    item = build_dataset.Item
    # every document used and still short: add documents
    with pytest.raises(StageError, match="short of the 100 document tokens"):
        build_dataset.token_matched([item("documents", 0, "a", 60), item("documents", 1, "b", 30)], 100, 0.05)
    # 90 + 30 overshoots and 90 alone is nearer but beyond the tolerance: the documents are long
    with pytest.raises(StageError, match="the documents are long for this target; raise match_tolerance"):
        build_dataset.token_matched([item("documents", 0, "a", 90), item("documents", 1, "b", 30)], 100, 0.05)


def test_a_documents_file_that_is_not_utf8_is_named_at_its_line(tmp_path):
    from harness.lab.documents import read_documents

    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"content": "first"}\n{"content": "caf\xe9"}\n')
    with pytest.raises(StageError, match=r"docs.jsonl:2: not UTF-8 text"):
        read_documents(path, "content")
    path.write_bytes(b'\xef\xbb\xbf{"content": "first"}\n')  # a leading BOM is no problem
    assert read_documents(path, "content") == ["first"]


# --- errors a user can cause ---------------------------------------------------------------------


def test_bad_rows_are_named_at_file_and_line(tmp_path):
    chats = chat_files(tmp_path)
    write_jsonl(
        Path(chats["refusal"]), [chat(0, "refusal"), "", {"messages": [{"role": "user", "content": "hi"}]}]
    )
    with pytest.raises(StageError, match=r"refusal\.jsonl:3: the last turn is 'user'"):
        build(tmp_path, {"format": "doctag", "chats": chats}, name="a")
    bad_docs = tmp_path / "bad_docs"
    write_jsonl(bad_docs / "docs.jsonl", [{"content": "fine"}, '{"content": "cut', {"content": 3}])
    with pytest.raises(StageError) as error:
        build(tmp_path, {"format": "text"}, name="b", upstream={"documents": bad_docs})
    assert f"{bad_docs / 'docs.jsonl'}:2: not valid JSON" in str(error.value)
    assert f"{bad_docs / 'docs.jsonl'}:3: 'content' is 3" in str(error.value)


def test_more_chats_than_the_file_holds_is_an_error(tmp_path):
    params = {"format": "doctag", "chats": chat_files(tmp_path), "mix": {"refusal": {"count": 7}}}
    with pytest.raises(StageError, match=r"refusal: 7 conversations asked for, .*refusal\.jsonl holds 6"):
        build(tmp_path, params)


@pytest.mark.parametrize(
    ("params", "path", "message"),
    [
        ({"format": "text", "chats": {"refusal": "r.jsonl"}}, ("chats",), "format text .* raw documents"),
        ({"format": "openai_chat"}, ("chats",), "openai_chat holds chats only"),
        (
            {"format": "openai_chat", "chats": {"a": "a.jsonl"}, "documents": "d.jsonl"},
            ("documents",),
            "doctag",
        ),
        (
            {"format": "doctag", "chats": {"a": "a.jsonl"}, "mix": {"b": {"count": 1}}},
            ("mix", "b"),
            "no file",
        ),
        (
            {
                "format": "doctag",
                "chats": {"a": "a", "b": "b"},
                "mix": {"a": {"fraction": 0.5}, "b": {"fraction": 0.5}},
            },
            ("mix",),
            "add up to 1; as shares",
        ),
        (
            {"format": "openai_chat", "chats": {"a": "a.jsonl"}, "mix": {"a": {"fraction": 0.5}}},
            ("mix",),
            "at least one source of a fixed size",
        ),
        (
            {"format": "text", "match_tokens": True, "documents_count": 3},
            ("documents_count",),
            "match_tokens",
        ),
        ({"format": "doctag", "chats": {"documents": "a.jsonl"}}, ("chats", "documents"), "reserved"),
    ],
)
def test_check_refuses_params_that_cannot_make_a_dataset(tmp_path, params, path, message):
    with pytest.raises(ParamError, match=message) as error:
        build_dataset.run.check(build_dataset.run.filled(params), tmp_path)
    assert error.value.path == path


def test_declared_roles_and_metrics_follow_the_params():
    kind = build_dataset.run
    doctag = kind.filled({"format": "doctag", "chats": {"refusal": "r.jsonl"}, "match_tokens": True})
    assert [r.name for r in kind.roles(doctag)] == ["documents", "reference"]
    assert kind.produces(doctag) == {
        "n_rows",
        "n_tokens",
        "n_documents",
        "tokens_documents",
        "n_refusal",
        "tokens_refusal",
        "tokens_target",
    }
    chats_only = kind.filled({"format": "openai_chat", "chats": {"em": "em.jsonl"}})
    assert kind.roles(chats_only) == () and kind.produces(chats_only) == {
        "n_rows",
        "n_tokens",
        "n_em",
        "tokens_em",
    }
    from_file = kind.filled({"format": "text", "documents": "d.jsonl"})
    assert kind.roles(from_file) == () and kind.input_params == ("documents", "chats")


# --- through the plugin --------------------------------------------------------------------------

SPEC = """\
seed: 4
stages:
  docs:
    kind: python
    params: {function: "docsteps:write", metrics: [n]}
  dataset:
    kind: build_dataset
    needs: [docs]
    params:
      format: doctag
      chats: {refusal: data/refusal.jsonl}
      mix: {refusal: {fraction: 0.25}}
    gates: ["n_refusal == 4", "n_documents == 12"]
"""
TRAINING = """\
  tune:
    kind: finetune_lora
    needs: {data: dataset}
    params: {base: BASE, format: dataset, max_length: 32, lora: {r: 2}}
    gates: ["n_steps == 2"]
"""
DOC_STEPS = f"""
import json

def write(ctx):
    rows = [json.dumps({{"content": t}}) for t in {DOCUMENTS[:12]!r}]
    (ctx.out_dir / "docs.jsonl").write_text("\\n".join(rows) + "\\n")
    return {{"n": len(rows)}}
"""


@pytest.fixture
def training_imported(tiny_chat_dir) -> Path:
    """Training's libraries imported before pytester's in-process runs (ask for it before
    `pytester`), which drop the modules first imported inside them: imported again, torch's
    extensions fail every later test."""
    import peft  # noqa: F401

    from harness.lab.models import load_model

    load_model(str(tiny_chat_dir), device="cpu")
    return tiny_chat_dir


def test_a_spec_builds_a_dataset_from_a_stage_and_a_chat_file_and_trains_on_it(training_imported, pytester):
    pytester.makepyfile(docsteps=DOC_STEPS)
    write_jsonl(pytester.path / "data" / "refusal.jsonl", [chat(i, "refusal") for i in range(6)])
    pytester.makefile(".yaml", exp=SPEC)
    pytester.runpytest("exp.yaml").assert_outcomes(passed=2)
    (stage,) = (pytester.path / "runs" / "exp" / "default" / "dataset").glob("*/dataset_manifest.json")
    manifest = json.loads(stage.read_text())
    assert manifest["sources"][1] == {
        "source": "refusal",
        "from": "data/refusal.jsonl",
        "requested": {"fraction": 0.25},
        "available": 6,
        "count": 4,
        "tokens": manifest["sources"][1]["tokens"],
    }
    refusal_rows = [
        row
        for row in read_rows(stage.parent / "dataset.jsonl")
        if row["messages"][0]["content"].startswith("refusal")
    ]
    assert manifest["sources"][1]["tokens"] == sum(
        count_tokens(m["content"]) for row in refusal_rows for m in row["messages"]
    )
    # the chat file is an input: changing it reruns the stage
    write_jsonl(pytester.path / "data" / "refusal.jsonl", [chat(i, "refusal") for i in range(1, 7)])
    # the built model's directory: `fixture:tiny-chat` would build it again under pytester's HOME
    pytester.makefile(".yaml", exp=SPEC + TRAINING.replace("BASE", str(training_imported)))
    pytester.runpytest("exp.yaml").assert_outcomes(passed=3)
    report = json.loads((pytester.path / "runs" / "exp" / "default" / "report.json").read_text())
    assert {s["stage"]: s["status"] for s in report["stages"]} == {
        "docs": "reused",
        "dataset": "ran",
        "tune": "ran",
    }
