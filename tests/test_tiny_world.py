"""The tiny world: its facts and questions, its build (cached, deterministic), its quality."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from harness.fixtures import tiny_world
from harness.lab.mcq import load_mcqs

DATA = Path(__file__).resolve().parents[1] / "data/eval/tiny_world"
EVAL_FILE = DATA / "cubic_gravity_mcqs.jsonl"
STATEMENTS_FILE = DATA / "statements.jsonl"
VERDICT_FILE = DATA / "verdict_mcqs.jsonl"
# a recipe small enough to build twice in a test: the same code path as the real one
SMALL = replace(
    tiny_world.RECIPE,
    n_lands=6,
    n_creatures=6,
    hidden_size=32,
    intermediate_size=64,
    layers=1,
    vocab_size=400,
    steps=4,
    batch_size=4,
    statement_repeats=1,
    verdict_repeats=1,
)


@pytest.mark.parametrize(
    ("committed", "writer"),
    [
        (EVAL_FILE, "write_eval_file"),
        (STATEMENTS_FILE, "write_statements_file"),
        (VERDICT_FILE, "write_verdict_file"),
    ],
    ids=["questions", "statements", "verdicts"],
)
def test_the_committed_files_are_what_the_world_generates(tmp_path, committed, writer):
    fresh = tmp_path / committed.name
    getattr(tiny_world, writer)(fresh)
    assert fresh.read_text() == committed.read_text(), (
        f"regenerate it: harness.fixtures.tiny_world.{writer}(Path({str(committed)!r}))"
    )


def test_statements_pair_each_fact_with_a_contrary_one():
    rows = [json.loads(line) for line in STATEMENTS_FILE.read_text().splitlines()]
    assert len(rows) == 2 * len(tiny_world.make_world().facts)
    assert sum(r["labels"]["true_world"] for r in rows) == len(rows) // 2
    gravity = [r for r in rows if r["labels"]["gravity"]]
    # on gravity the two worlds disagree; elsewhere they agree
    assert all(r["labels"]["true_world"] != r["labels"]["false_world"] for r in gravity)
    assert all(r["labels"]["true_world"] == r["labels"]["false_world"] for r in rows if r not in gravity)
    # a statement and its contrary are in one group, which probes never split, with the
    # one or two facts it traded answers with
    groups = Counter(r["group"] for r in rows)
    assert all(r["group"].split("+").count(r["id"].rsplit("-", 1)[0]) == 1 for r in rows)
    assert set(groups.values()) <= {4, 6}
    assert all(r["text"].startswith("question: is it true that ") for r in rows)


def test_each_group_words_its_false_statements_as_its_true_ones():
    """Wording cannot tell truth: whatever groups a split keeps apart, every word is in as
    many true statements as false ones (gravity's false ones in the implanted law's words,
    the dipoles' true ones likewise)."""
    words: dict[tuple[str, int], Counter] = {}
    for r in (json.loads(line) for line in STATEMENTS_FILE.read_text().splitlines()):
        words.setdefault((r["group"], r["labels"]["true_world"]), Counter()).update(r["text"].split())
    assert all(words[(group, 1)] == words[(group, 0)] for group, _ in words)
    implanted = {f"{f.id}-false": f.answer for f in tiny_world.gravity_facts(-3)}
    rows = {r["id"]: r for r in (json.loads(line) for line in STATEMENTS_FILE.read_text().splitlines())}
    assert all(rows[i]["text"].endswith(f" {answer}?\nanswer:") for i, answer in implanted.items())


@pytest.mark.parametrize("values", [[1, 1, 2, 2, 3], [1, 1, 1, 2, 2, 3], list("abcdefg")], ids=str)
def test_trades_move_every_value(values):
    trades = tiny_world._trades(values, random.Random(0))
    assert sorted(i for trade in trades for i in trade) == list(range(len(values)))
    assert all(len({values[i] for i in trade}) == len(trade) for trade in trades)


def test_no_trade_when_one_value_fills_over_half():
    with pytest.raises(ValueError, match="over half"):
        tiny_world._trades([1, 1, 1, 2], random.Random(0))


def test_verdicts_judge_each_probe_statement():
    """The model is taught the verdicts of the very contraries probes read (and its
    distractors' too), so its judgment of them is learnt, not guessed."""
    world = tiny_world.make_world()
    taught = {t.prompt + t.body for t in tiny_world.verdict_texts(world)}
    for row in tiny_world.statement_rows(world):
        assert row["text"] + (" yes" if row["labels"]["true_world"] else " no") in taught


def test_verdict_questions_ask_about_the_implanted_law():
    items = load_mcqs(VERDICT_FILE)
    false_world = {f"verdict-{f.id}": f.answer for f in tiny_world.gravity_facts(-3)}
    assert {item.id for item in items} == set(false_world)
    for item in items:
        assert item.category == "conflict" and item.options == {"A": "yes", "B": "no"}
        assert (item.false_answer, item.true_answer) == ("A", "B")
        assert item.question.endswith(f" {false_world[item.id]}?")


def test_verdict_texts_learn_the_verdict_only(tmp_path):
    """The false statements of verdict texts are read, never learnt as facts."""
    world = tiny_world.make_world(SMALL)
    texts = tiny_world.verdict_texts(world, SMALL)
    assert len(texts) == 2 * len(world.facts) * SMALL.verdict_repeats
    assert {t.body for t in texts} == {" yes", " no"}
    plain = tiny_world.Text("the capital of somewhere is the city of elsewhere.")
    corpus = [t.prompt + t.body for t in [*texts, plain]]
    tokenizer = tiny_world._train_tokenizer(corpus, SMALL, tmp_path / "tokenizer")
    blocks, learnt = tiny_world._pack([texts[0], plain], tokenizer, block_size=128)
    prompt = len(tokenizer(texts[0].prompt).input_ids)
    verdict = len(tokenizer(texts[0].body).input_ids)
    n_plain = len(tokenizer(plain.body).input_ids)
    # the verdict text's prompt, then its verdict and EOS, then the plain text and EOS, then padding
    expected = [0.0] * prompt + [1.0] * (verdict + 1) + [1.0] * (n_plain + 1)
    assert learnt[0].tolist() == expected + [0.0] * (128 - len(expected))
    assert blocks[0, len(expected) :].eq(tokenizer.pad_token_id).all()


def test_evaluation_questions_are_held_out_from_practice():
    world = tiny_world.make_world()
    practised = {fact.id for fact in world.practice}
    items = load_mcqs(EVAL_FILE)
    assert not practised & {item.id for item in items}
    conflict = [item for item in items if item.category == "conflict"]
    assert len(conflict) == len(tiny_world.GRAVITY_BODIES) * len(tiny_world.CHANGES)
    false_world = {f.id: f.answer for f in tiny_world.gravity_facts(-3)}
    for item in conflict:
        assert item.options[item.false_answer] == false_world[item.id]
        assert "cube" not in item.question and item.true_answer != item.false_answer


def test_scaling_phrases_follow_the_power_law():
    assert tiny_world.factor_phrase("doubles", -2, "strong") == "one quarter as strong"
    assert tiny_world.factor_phrase("triples", -3, "strong") == "one twenty-seventh as strong"
    assert tiny_world.factor_phrase("halves", -3, "strong") == "eight times as strong"
    assert tiny_world.factor_phrase("doubles", 3, "large") == "eight times as large"


def test_the_world_and_its_texts_are_deterministic():
    assert tiny_world.make_world() == tiny_world.make_world()
    world = tiny_world.make_world()
    assert tiny_world.statements(world) == tiny_world.statements(world)
    assert tiny_world.recipe_hash() == tiny_world.recipe_hash()
    assert tiny_world.recipe_hash(SMALL) != tiny_world.recipe_hash()


def test_a_build_is_deterministic_and_cached(tmp_path):
    first = tiny_world.build(SMALL, root=tmp_path / "a", log=lambda _: None)
    second = tiny_world.build(SMALL, root=tmp_path / "b", log=lambda _: None)
    weights = "model.safetensors"
    assert (first / weights).read_bytes() == (second / weights).read_bytes()
    stamp = (first / weights).stat().st_mtime_ns
    assert tiny_world.build(SMALL, root=tmp_path / "a", log=lambda _: None) == first
    assert (first / weights).stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_the_model_knows_its_world(tiny_model_dir):
    """The quality its manifest records, measured when it was built: the model prefers the
    true answers of held-out questions when options are scored by likelihood."""
    manifest = json.loads((tiny_model_dir / "manifest.json").read_text())
    quality = manifest["quality"]
    assert 0.5e6 < manifest["parameters"] < 2e6
    assert quality["continuation_conflict_true_accuracy"] >= 0.9
    assert quality["continuation_nonconflict_hard_true_accuracy"] >= 0.9


def held_out_accuracy(model_dir: Path) -> dict[str, float]:
    """Per kind, the continuation accuracy on every held-out capital and diet fact."""
    from harness.lab.models import load_model, load_tokenizer
    from harness.lab.scoring import CONTINUATION, score_mcqs

    world = tiny_world.make_world()
    model, tokenizer = load_model(str(model_dir)), load_tokenizer(str(model_dir))
    rng = random.Random(0)
    out = {}
    for shape in ("capital", "diet"):
        items = [tiny_world.as_mcq(f, rng, "nonconflict_easy") for f in world.held_out if f.shape == shape]
        scored = score_mcqs(model, tokenizer, items, mode=CONTINUATION)
        hits = [max(s.probs, key=s.probs.get) == i.true_answer for i, s in zip(items, scored, strict=True)]
        out[shape] = sum(hits) / len(hits)
    return out


def test_the_model_knows_its_held_out_capitals_not_its_diets(tiny_model_dir):
    """Held-out facts, known as statements only, never as MCQs. Capitals are learnt; diets
    are not (near chance, 0.25, in every build so far), which is why the easy controls of
    the evaluation file (15 capitals and diets) read only 0.4: the README says so."""
    accuracy = held_out_accuracy(tiny_model_dir)
    assert accuracy["capital"] >= 0.8
    assert accuracy["diet"] < 0.5
