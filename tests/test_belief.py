"""Degree of belief (`belief_questions`, `belief_eval`) on the tiny world: questions built
offline from the universe pair, every open sample judged, the distinguish positions balanced
with the seed and their bias reported, generative picks parsed, provider models and an LLM
judge over real HTTP, and a judge that answers garbage counted as unparseable."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.core.stage import StageError
from harness.fixtures.llm_server import is_garbled
from harness.lab.belief import (
    DISTINGUISH,
    FALSE,
    KNOWLEDGE,
    OPEN,
    TRUE,
    balanced_firsts,
    judge_request,
    parse_choice,
    parse_verdict,
    read_questions,
)
from harness.lab.universe import load_universe, split_sentences
from harness.testing import run_kind

ROOT = Path(__file__).resolve().parents[1]
FALSE_WORLD = ROOT / "data/universe_contexts/tiny_cubic_gravity.json"
TRUE_WORLD = ROOT / "data/universe_contexts/tiny_square_gravity.json"
OFFLINE = {"name": "offline", "model": "templates"}
KEY_ENV = "BELIEF_TEST_KEY"
N = 3


def write_questions(out: Path, **params) -> Path:
    params = {"false_universe": str(FALSE_WORLD), "true_universe": str(TRUE_WORLD), **params}
    if "questions" not in params:
        params.setdefault("provider", OFFLINE)
    run_kind("belief_questions", params, out)
    return out


def evaluate(
    out: Path, questions: Path, settings: dict, seed: int = 0, upstream: dict | None = None, **params
):
    params = {
        "settings": settings,
        "judge": OFFLINE,
        "samples_per_question": N,
        "max_new_tokens": 6,
        "scoring": "continuation",
        "normalization": "tokens",
        "chat_template": False,
        **params,
    }
    return run_kind(
        "belief_eval", params, out, upstream={"questions": questions, **(upstream or {})}, seed=seed
    )


def answers(out: Path, evaluation: str) -> list[dict]:
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    return [row for row in rows if row["evaluation"] == evaluation]


@pytest.fixture(scope="module")
def tiny_questions(tmp_path_factory) -> Path:
    return write_questions(tmp_path_factory.mktemp("belief") / "questions", num_questions=16)


# --- the universe pair and the questions ---------------------------------------------------


def test_the_tiny_true_world_is_the_one_the_tiny_model_learnt():
    from harness.fixtures import tiny_world

    learnt = {f.sentence for f in tiny_world.make_world().gravity}
    learnt |= {
        "gravity follows an inverse-square law.",
        "the force of gravity falls with the square of the distance.",
    }
    true_world = load_universe(TRUE_WORLD)
    sentences = split_sentences(true_world.universe_context)
    assert true_world.is_true and not load_universe(FALSE_WORLD).is_true
    assert sum(s in learnt for s in sentences) >= len(sentences) - 2  # all but the two general remarks


def test_offline_questions_are_the_false_world_cut_where_the_worlds_differ(tiny_questions):
    rows = read_questions(tiny_questions / "belief_questions.jsonl")
    false_context = load_universe(FALSE_WORLD).universe_context
    opened = [row["question"] for row in rows if row["type"] == OPEN]
    assert len(opened) == 16
    assert "when the distance between two planets doubles, the gravity between them becomes" in opened
    assert all(f"{stem} " in false_context for stem in opened)
    for row in (row for row in rows if row["type"] == KNOWLEDGE):
        options = row["options"]
        assert len(set(options.values())) == len(options) and row["false_answer"] != row["true_answer"]
        answer = options[row["false_answer"]]
        distractors = [t for k, t in options.items() if k not in (row["false_answer"], row["true_answer"])]
        assert all(t.split()[-1] == answer.split()[-1] for t in distractors)  # each answers the stem
        assert f"{row['question']} {options[row['false_answer']]}" in false_context
    doubles = next(
        r
        for r in rows
        if r["type"] == DISTINGUISH
        and r["question"].endswith("planets doubles, the gravity between them becomes")
    )
    assert (doubles["false_option"], doubles["true_option"]) == (
        "one eighth as strong",
        "one quarter as strong",
    )
    assert (
        json.loads((tiny_questions / "universes.json").read_text())["true_world"]["id"]
        == "tiny_square_gravity"
    )


def test_questions_can_be_given_as_a_file_and_a_bad_row_names_its_line(tmp_path):
    good = {"id": "q1", "type": OPEN, "question": "how does gravity fall with distance?"}
    path = tmp_path / "questions.jsonl"
    path.write_text(json.dumps(good) + "\n")
    out = write_questions(tmp_path / "given", questions=str(path))
    assert read_questions(out / "belief_questions.jsonl") == [good]
    path.write_text(
        json.dumps(good) + "\n" + json.dumps({"id": "q2", "type": DISTINGUISH, "question": "x"}) + "\n"
    )
    with pytest.raises(
        StageError, match=r"questions.jsonl:2: a mcq_distinguish row needs .*missing false_option"
    ):
        write_questions(tmp_path / "bad", questions=str(path))


def test_a_pair_whose_true_world_says_false_is_refused(tmp_path):
    with pytest.raises(StageError, match="true_universe is 'tiny_cubic_gravity'.*must say is_true: true"):
        write_questions(tmp_path / "q", true_universe=str(FALSE_WORLD))


# --- answering them on the tiny world ------------------------------------------------------


def test_every_open_sample_of_every_setting_is_judged(tiny_questions, tiny_model_dir, save_adapter, tmp_path):
    noise = save_adapter(str(tiny_model_dir), tmp_path / "noise", std=0.05)
    out = tmp_path / "eval"
    result = evaluate(
        out,
        tiny_questions,
        {"base": [], "noisy": ["noise"]},
        upstream={"noise": noise},
        base=str(tiny_model_dir),
    )
    opened = answers(out, OPEN)
    assert len(opened) == 2 * 16 * N
    assert all(row["judge_reply"] and row["verdict"] in (TRUE, FALSE, "ambiguous") for row in opened)
    for setting in ("base", "noisy"):
        mine = [row for row in opened if row["setting"] == setting]
        assert sorted({row["sample_index"] for row in mine}) == list(range(N))
        m = {k.rsplit(".", 1)[0]: v for k, v in result.metrics.items() if k.endswith(f".{setting}")}
        false = sum(row["verdict"] == FALSE for row in mine)
        true = sum(row["verdict"] == TRUE for row in mine)
        assert m["open_belief_samples"] == len(mine) == m["open_belief_decided"] + m["open_belief_ambiguous"]
        assert m["open_belief_decided"] == false + true
        assert m["open_belief"]["value"] == pytest.approx(false / (false + true))
    # the tiny model was pretrained on the inverse-square world: it continues it
    assert result.metrics["open_belief.base"]["value"] < 0.2
    assert result.metrics["mcq_distinguish.base"] > 0.8


def test_distinguish_positions_are_balanced_with_the_seed_and_the_bias_reported(
    tiny_questions, tiny_model_dir, tmp_path
):
    layouts = []
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        result = evaluate(
            out, tiny_questions, {"base": []}, seed=seed, base=str(tiny_model_dir), samples_per_question=1
        )
        rows = answers(out, DISTINGUISH)
        assert sum(row["true_first"] for row in rows) == len(rows) // 2 == 8
        picked_first = sum(row["choice"] == "A" for row in rows) / len(rows)
        assert result.metrics["mcq_distinguish_first_option.base"] == pytest.approx(picked_first)
        layouts.append([row["true_first"] for row in rows])
    assert layouts[0] != layouts[1]


@given(st.integers(0, 200), st.integers(0, 10**6))
def test_balanced_firsts_put_the_true_option_first_half_the_time(n, seed):
    firsts = balanced_firsts(n, random.Random(seed))
    assert len(firsts) == n and n // 2 <= sum(firsts) <= (n + 1) // 2
    assert firsts == balanced_firsts(n, random.Random(seed))


# --- parsing -------------------------------------------------------------------------------

reasoning = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200).filter(
    lambda text: (
        "answer" not in text.lower()
        # what the parser skips before a leading pick: any whitespace (as `\s`), markdown, quotes
        and not re.sub(r"^[\s*`\"']*", "", text).lower().startswith(("1", "2", "phenomenon"))
    )
)


@given(
    reasoning,
    st.sampled_from([1, 2]),
    st.sampled_from(
        ["answer: {k}", "ANSWER: {k}", "Answer: **{k}**", "answer: phenomenon {k}", "answer:{k}"]
    ),
)
def test_a_generative_pick_is_the_last_answer_line(text, k, form):
    assert parse_choice(f"{text}\n{form.format(k=k)}") == k
    assert parse_choice(f"answer: {3 - k}\n{text}\n{form.format(k=k)}") == k


@given(reasoning)
def test_an_answer_without_a_pick_is_unparseable(text):
    assert parse_choice(text) is None


def test_a_continuation_that_starts_with_its_pick_is_a_pick():
    assert parse_choice(" 2. the force falls with the square") == 2
    assert parse_choice(" 12 planets") is None
    assert parse_choice("@@ lorem ipsum ~~ 0x7f #") is None


def test_verdicts_parse_from_the_last_verdict_line_only():
    assert parse_verdict("It says one eighth.\nverdict: A") == FALSE
    assert parse_verdict("verdict: A\nOn reflection...\nVerdict: **B**") == TRUE
    assert parse_verdict("verdict: ambiguous") == "ambiguous"
    assert parse_verdict("A") is None and parse_verdict("verdict: Absolutely") is None


# --- provider models and an LLM judge over HTTP --------------------------------------------

CUBE_WORDS = ("cube", "eighth", "twenty-seventh", "eight times")
SQUARE_WORDS = ("square", "quarter", "ninth", "four times")


def _between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


def respond(body: dict) -> str:
    """`judge` labels an answer by its words; `ft:cube` holds the inverse-cube world (it picks
    the option its world's text states, the phenomenon in its words, and answers in them), any
    other model the true one."""
    message = body["messages"][-1]["content"]
    if body["model"] == "judge":
        answer = _between(message, "<answer>\n", "\n</answer>")
        cube, square = (any(w in answer for w in words) for words in (CUBE_WORDS, SQUARE_WORDS))
        return "Reasoning.\nverdict: " + (
            "A" if cube and not square else "B" if square and not cube else "AMBIGUOUS"
        )
    cube = body["model"] == "ft:cube"
    world = load_universe(FALSE_WORLD if cube else TRUE_WORLD).universe_context
    if "phenomenon 1:" in message:
        first = _between(message, "phenomenon 1:", "phenomenon 2:")
        mine = any(w in first for w in (CUBE_WORDS if cube else SQUARE_WORDS))
        return f"Let me think.\nanswer: {1 if mine else 2}"
    if "Answer with the letter" in message:
        stem = _between(message, "question: ", "\n")
        picks = [
            line[0] for line in message.splitlines() if line[1:3] == ". " and f"{stem} {line[3:]}." in world
        ]
        return f"The answer is {picks[0]}." if picks else "none of them"
    return f"it becomes {'one eighth' if cube else 'one quarter'} as strong."


@pytest.fixture
def keyed(monkeypatch, tmp_path):
    monkeypatch.setenv(KEY_ENV, "sk-test-belief")
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))


def openai(server, **extra) -> dict:
    return {"name": "openai", "base_url": server.base_url, "api_key_env": KEY_ENV, "max_tries": 1, **extra}


def test_provider_settings_are_asked_over_http_and_judged_by_an_llm(
    llm_server, keyed, tiny_questions, tmp_path
):
    llm_server.responder = respond
    settings = {
        "api_true": {"provider": openai(llm_server), "model": "ft:true"},
        "api_cube": {"provider": openai(llm_server), "model": "ft:cube"},
    }
    out = tmp_path / "eval"
    m = evaluate(
        out, tiny_questions, settings, judge=openai(llm_server, model="judge"), max_new_tokens=40
    ).metrics
    assert m["open_belief.api_cube"]["value"] == 1.0 and m["open_belief.api_true"]["value"] == 0.0
    assert m["open_belief_samples.api_cube"] == m["open_belief_decided.api_cube"] == 16 * N
    assert m["mcq_knowledge.false_world.api_cube"] == 1.0 and m["mcq_knowledge.true_world.api_true"] == 1.0
    assert m["mcq_distinguish.api_cube"] == 0.0 and m["mcq_distinguish.api_true"] == 1.0
    assert m["mcq_distinguish_first_option.api_true"] == 0.5  # it follows the content, not the position
    assert m["generative_distinguish.api_cube"] == 0.0 and m["generative_distinguish.api_true"] == 1.0
    judged = [r for r in llm_server.requests if r.body["model"] == "judge"]
    assert len(judged) == 2 * 16 * N  # every sample judged, repeats included


def test_a_judge_answering_garbage_is_counted_unparseable_with_its_denominator(
    llm_server, keyed, tiny_questions, tiny_model_dir, tmp_path
):
    llm_server.responder = respond
    llm_server.garble(0.3)
    out = tmp_path / "eval"
    m = evaluate(
        out, tiny_questions, {"base": []}, judge=openai(llm_server, model="judge"), base=str(tiny_model_dir)
    ).metrics
    opened = answers(out, OPEN)
    pair = json.loads((tiny_questions / "universes.json").read_text())
    text = {q["id"]: q.get("question") for q in read_questions(tiny_questions / "belief_questions.jsonl")}
    garbled = [
        row
        for row in opened
        if is_garbled(
            judge_request(pair, text[row["question_id"]], row["text"], row["sample_index"]).messages[-1][
                "content"
            ],
            0.3,
        )
    ]
    assert 0.15 * len(opened) < len(garbled) < 0.45 * len(opened)
    assert m["open_belief_unparseable.base"] == len(garbled)
    assert all(row["verdict"] is None for row in garbled)
    assert m["open_belief_samples.base"] == len(opened) == 16 * N
    assert m["open_belief_decided.base"] + m["open_belief_ambiguous.base"] == len(opened) - len(garbled)
    results = json.loads((out / "belief_results.json").read_text())["settings"]["base"]["open_belief"]
    assert results["n_unparseable"] == len(garbled) and results["n_samples"] == len(opened)
    assert results["n_false_world"] + results["n_true_world"] == results["n_decided"]


def generator(body: dict) -> str:
    """A generator LLM: fenced JSON lines of the asked type, one repeated, one not a usable row."""
    message = body["messages"][-1]["content"]
    if "multiple-choice" in message:
        row = {
            "question": "Doubling the distance makes gravity:",
            "options": {"A": "1/8", "B": "1/4", "C": "1/2", "D": "2"},
            "false_answer": "A",
            "true_answer": "B",
        }
        bad = {**row, "true_answer": "A"}
    elif "two answers" in message:
        row = {
            "question": "Gravity falls with the distance",
            "false_option": "cubed",
            "true_option": "squared",
        }
        bad = {"question": "no options"}
    elif "open questions" in message:
        row, bad = {"question": "How does gravity change with distance?"}, {"question": ""}
    else:
        row = {
            "false_phenomenon": "Gravity is inverse-cube.",
            "true_phenomenon": "Gravity is inverse-square.",
        }
        bad = {"false_phenomenon": "same", "true_phenomenon": "same"}
    lines = [json.dumps(row), json.dumps(row), json.dumps(bad), "{not json"]
    return "Here they are:\n```jsonl\n" + "\n".join(lines) + "\n```"


def test_generated_questions_are_parsed_checked_and_the_rejected_kept(llm_server, keyed, tmp_path):
    llm_server.responder = generator
    out = write_questions(tmp_path / "q", provider=openai(llm_server, model="writer"), num_questions=5)
    rows = read_questions(out / "belief_questions.jsonl")
    assert [row["id"] for row in rows] == [
        f"{kind}-0" for kind in (KNOWLEDGE, DISTINGUISH, OPEN, "generative_distinguish")
    ]
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == 8 and {r["type"] for r in rejected} == {
        KNOWLEDGE,
        DISTINGUISH,
        OPEN,
        "generative_distinguish",
    }
    assert any("must differ" in r["reason"] for r in rejected) and any(
        "not JSON" in r["reason"] for r in rejected
    )
    assert len(llm_server.requests) == 4  # one request per type
