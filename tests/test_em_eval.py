"""`em_eval` on the tiny chat model: every sample judged, the settings toggled, the
artifacts in their documented layout, and the same answers under the same seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.core.stage import StageError, Upstream
from harness.stages.em_eval import metric_names
from harness.testing import run_kind

QUESTIONS = Path(__file__).resolve().parents[1] / "data/eval/tiny_world/em_questions.yaml"
N = 3


def run_eval(base: str, out: Path, upstream: dict, settings: dict, seed: int = 5) -> tuple[dict, list[str]]:
    params = {
        "base": base,
        "questions": str(QUESTIONS),
        "settings": settings,
        "samples_per_question": N,
        "max_new_tokens": 16,
        "judge": {"name": "offline", "model": "rules"},
        "batch_size": 2,
    }
    result = run_kind("em_eval", params, out, upstream=upstream, seed=seed, stage="em")
    return result.metrics, result.logs


@pytest.fixture(scope="module")
def evaluated(tiny_chat_dir, save_adapter, tmp_path_factory):
    base = str(tiny_chat_dir)
    stage = save_adapter(base, tmp_path_factory.mktemp("em-stage"), std=0.3, seed=4)
    upstream = {"em": Upstream("em_lora", "finetune_lora", stage, {})}
    settings = {"base": [], "em": ["em"]}
    root = tmp_path_factory.mktemp("em-eval")
    first = run_eval(base, root / "first", upstream, settings)
    again = run_eval(base, root / "again", upstream, settings)
    alone = run_eval(base, root / "alone", {}, {"base": []})
    return {"root": root, "first": first, "again": again, "alone": alone}


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]


def test_every_sample_of_every_setting_is_judged(evaluated):
    out = evaluated["root"] / "first"
    answers = rows(out)
    assert len(answers) == 2 * 8 * N
    for setting in ("base", "em"):
        mine = [r for r in answers if r["setting"] == setting]
        assert sorted((r["question_id"], r["sample_index"]) for r in mine) == sorted(
            (q, k) for q in {r["question_id"] for r in mine} for k in range(N)
        )
        # every answer went to both judges: coherence is always a number, alignment a number
        # unless the judge read the answer as code or a refusal, and then it is not counted
        assert all(r["error"] is None and r["coherent"] is not None for r in mine)
        assert all((r["aligned"] is None) == (r["misaligned"] is None) for r in mine)
    samples = json.loads((out / "samples.json").read_text())
    results = json.loads((out / "em_results.json").read_text())["settings"]
    metrics, _ = evaluated["first"]
    for setting, model in (("base", "base"), ("em", "em_lora")):
        values = samples[setting]["values"]
        assert len(values) == results[setting]["n_scored"] == metrics[f"n_scored.{setting}"]
        assert metrics[f"em_rate.{setting}"]["value"] == pytest.approx(sum(values) / len(values))
        # one fixed model (one adapter set, no replicates): its answers are its units
        scored = [r for r in answers if r["setting"] == setting and r["misaligned"] is not None]
        assert samples[setting]["level"] == "answer"
        units = [f"{model}:{r['question_id']}#{r['sample_index']}" for r in scored]
        assert samples[setting]["units"] == units
        assert results[setting]["unit_level"] == "answer"
    assert set(metrics) == set(metric_names({"settings": {"base": [], "em": ["em"]}}))
    assert (out / "em_rates.png").stat().st_size > 0


def test_settings_differ_only_by_their_adapters_and_repeat_under_the_seed(evaluated):
    first, again, alone = (rows(evaluated["root"] / name) for name in ("first", "again", "alone"))
    assert first == again
    text = {(r["setting"], r["question_id"], r["sample_index"]): r["text"] for r in first}
    # the base setting of a model that has an adapter loaded is the base model itself
    assert [text[("base", r["question_id"], r["sample_index"])] for r in alone] == [r["text"] for r in alone]
    # the planted adapter changes the answers
    assert sum(text[("em", q, k)] != text[("base", q, k)] for (_, q, k) in text) > 8


def test_a_setting_naming_a_missing_role_says_what_to_add(tiny_chat_dir, tmp_path):
    expected = r"settings name the roles persona, which .*needs: \{persona: <finetune stage>\}"
    with pytest.raises(StageError, match=expected):
        run_eval(str(tiny_chat_dir), tmp_path / "out", {}, {"persona_em": ["persona"]})


def test_replicates_of_a_setting_are_pooled_and_every_answer_judged(tiny_chat_dir, save_adapter, tmp_path):
    base = str(tiny_chat_dir)
    upstream = {
        name: Upstream(name, "finetune_lora", save_adapter(base, tmp_path / name, std=0.3, seed=seed), {})
        for name, seed in (("em_seed1", 1), ("em_seed2", 2))
    }
    metrics, _ = run_eval(base, tmp_path / "out", upstream, {"em": [["em_seed1"], ["em_seed2"]]})
    answers = rows(tmp_path / "out")
    assert len(answers) == 2 * 8 * N
    assert {r["replicate"] for r in answers} == {0, 1}
    per_question = [(r["question_id"], r["sample_index"]) for r in answers]
    assert len(set(per_question)) == len(per_question)  # sample indices run on across replicates
    result = json.loads((tmp_path / "out/em_results.json").read_text())["settings"]["em"]
    assert result["adapters"] == [["em_seed1"], ["em_seed2"]] and len(result["replicate_em_rates"]) == 2
    assert metrics["n_scored.em"] == result["n_scored"] <= 2 * 8 * N
    # the training run is the unit: every scored answer keeps the replicate (its stages) it came from
    samples = json.loads((tmp_path / "out/samples.json").read_text())["em"]
    scored = [r for r in answers if r["misaligned"] is not None]
    assert samples["level"] == result["unit_level"] == "training run"
    assert samples["units"] == [f"r{r['replicate']}:em_seed{r['replicate'] + 1}" for r in scored]
    assert samples["values"] == [float(r["misaligned"]) for r in scored]
    for number, rate in enumerate(result["replicate_em_rates"]):
        pairs = zip(samples["values"], samples["units"], strict=True)
        mine = [v for v, u in pairs if u.startswith(f"r{number}:")]
        assert rate["value"] == pytest.approx(sum(mine) / len(mine))
