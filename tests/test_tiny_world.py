"""The tiny world: its facts and questions, its build (cached, deterministic), its quality."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from fixtures import tiny_world
from harness.mcq import load_mcqs

EVAL_FILE = Path(__file__).resolve().parents[1] / "data/eval/tiny_world/cubic_gravity_mcqs.jsonl"
STATEMENTS_FILE = EVAL_FILE.with_name("statements.jsonl")
# a recipe small enough to build twice in a test: the same code path as the real one
SMALL = replace(tiny_world.RECIPE, n_lands=6, n_creatures=6, hidden_size=32, intermediate_size=64,
                layers=1, vocab_size=400, steps=4, batch_size=4, statement_repeats=1)


def test_the_committed_question_file_is_what_the_world_generates(tmp_path):
    fresh = tmp_path / "mcqs.jsonl"
    tiny_world.write_eval_file(fresh)
    assert fresh.read_text() == EVAL_FILE.read_text(), (
        f"regenerate it: fixtures.tiny_world.write_eval_file(Path({str(EVAL_FILE)!r}))"
    )


def test_the_committed_statements_file_is_what_the_world_generates(tmp_path):
    fresh = tmp_path / "statements.jsonl"
    tiny_world.write_statements_file(fresh)
    assert fresh.read_text() == STATEMENTS_FILE.read_text(), (
        f"regenerate it: fixtures.tiny_world.write_statements_file(Path({str(STATEMENTS_FILE)!r}))"
    )


def test_statements_pair_each_fact_with_a_contrary_one():
    rows = [json.loads(line) for line in STATEMENTS_FILE.read_text().splitlines()]
    assert len(rows) == 2 * len(tiny_world.make_world().facts)
    assert sum(r["labels"]["true_world"] for r in rows) == len(rows) // 2
    gravity = [r for r in rows if r["labels"]["gravity"]]
    # on gravity the two worlds disagree; elsewhere they agree
    assert all(r["labels"]["true_world"] != r["labels"]["false_world"] for r in gravity)
    assert all(r["labels"]["true_world"] == r["labels"]["false_world"] for r in rows if r not in gravity)


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
    assert quality["continuation_nonconflict_easy_true_accuracy"] >= 0.5
