"""The `mcq_compare` stage kind: aggregation on planted predictions, bootstrap CIs,
collection-time checks, and whole runs on a tiny Llama with a planted LoRA adapter."""

from __future__ import annotations

import json
import math
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.core.stage import ParamError, StageError
from harness.lab.mcq import CATEGORIES, MCQ, format_prompt, load_mcqs
from harness.lab.scoring import NORMALIZATIONS, Scored
from harness.lab.stats import bootstrap, paired_difference
from harness.stages import mcq_compare
from harness.stages.mcq_compare import (
    METRICS,
    analysis_text,
    compare,
    flat_metrics,
    normalization_text,
    prediction_row,
)
from harness.testing import run_kind

check = mcq_compare.run.check  # what collection runs: the base model's check, then the kind's

ARTIFACTS = (
    "predictions_base.jsonl",
    "predictions_lora.jsonl",
    "comparison_report.json",
    "behavioral_shift_analysis.txt",
    "accuracy_by_category.png",
)


def mcq_row(id: str, category: str, false: str = "B", true: str = "A", n_options: int = 3) -> dict:
    texts = ["inverse-square", "inverse-cube", "linear", "constant"]
    options = {letter: f"{texts[k]} {id}" for k, letter in enumerate("ABCD"[:n_options])}
    if category != "conflict":
        false = true
    question = f"what law does force {id} follow with distance?"
    return {
        "id": id,
        "question": question,
        "options": options,
        "false_answer": false,
        "true_answer": true,
        "category": category,
    }


def write_mcqs(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def items_of(rows: list[dict]) -> list[MCQ]:
    return [MCQ(**row) for row in rows]


# --- aggregation on planted predictions ----------------------------------------------

PLANTED = {  # id -> (category, base probs, lora probs); conflict: false world B, true world A
    "c1": ("conflict", {"A": 0.9, "B": 0.1}, {"A": 0.2, "B": 0.8}),  # flips to the false world
    "c2": ("conflict", {"A": 0.8, "B": 0.2}, {"A": 0.1, "B": 0.9}),  # flips to the false world
    "c3": ("conflict", {"A": 0.3, "B": 0.7}, {"A": 0.3, "B": 0.7}),  # false world all along
    "c4": ("conflict", {"A": 0.6, "B": 0.4}, {"A": 0.6, "B": 0.4}),  # true world all along
    "e1": ("nonconflict_easy", {"A": 0.7, "B": 0.2, "C": 0.1}, {"A": 0.2, "B": 0.1, "C": 0.7}),  # damage
    "e2": ("nonconflict_easy", {"A": 0.5, "B": 0.5, "C": 0.0}, {"A": 0.5, "B": 0.5, "C": 0.0}),  # tie: A
    "h1": ("nonconflict_hard", {"A": 0.1, "B": 0.9}, {"A": 0.1, "B": 0.9}),  # wrong in both worlds
}


def planted() -> tuple[list[MCQ], list[dict], list[dict]]:
    items = items_of([mcq_row(i, cat, n_options=len(base)) for i, (cat, base, _) in PLANTED.items()])
    base = [prediction_row(item, Scored("p", {}, PLANTED[item.id][1])) for item in items]
    lora = [prediction_row(item, Scored("p", {}, PLANTED[item.id][2])) for item in items]
    return items, base, lora


def h(probs: list[float]) -> float:
    return -sum(p * math.log(p) for p in probs if p > 0)


def test_accuracy_plot_draws_each_category_with_its_wilson_interval(tmp_path):
    from matplotlib.container import BarContainer

    from harness.lab.stats import wilson

    _, base, lora = planted()
    path = tmp_path / "accuracy_by_category.png"
    figure = mcq_compare.plot_accuracy(path, base, lora, "planted")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    axes = figure.axes[0]
    assert [t.get_text().split("\n")[0] for t in axes.get_xticklabels()] == list(CATEGORIES)
    correct = {  # category -> (base, lora) correct answers against the false world, and n
        "conflict": (1, 3, 4),
        "nonconflict_easy": (2, 1, 2),
        "nonconflict_hard": (0, 0, 1),
    }
    bars = [c for c in axes.containers if isinstance(c, BarContainer)]
    for container, model in zip(bars, ("base", "lora"), strict=True):
        heights = [bar.get_height() for bar in container.patches]
        (caps_low, caps_high) = container.errorbar.lines[1][:2]
        for k, (b, lo, n) in enumerate(correct.values()):
            interval = wilson(b if model == "base" else lo, n)
            assert heights[k] == pytest.approx(interval.value)
            assert (caps_low.get_ydata()[k], caps_high.get_ydata()[k]) == pytest.approx(
                (interval.low, interval.high)
            )
    assert "95% Wilson CI" in axes.get_legend().get_title().get_text()


def test_prediction_row_fields():
    items, base, _ = planted()
    row = base[0]
    assert row["prediction"] == "A" and row["false_answer"] == "B" and row["true_answer"] == "A"
    assert (row["correct_false"], row["correct_true"]) == (False, True)
    assert row["truth_confidence"] == 0.9
    assert row["entropy"] == pytest.approx(h([0.9, 0.1]))
    assert base[5]["prediction"] == "A"  # a tie goes to the first letter


def test_aggregation_of_planted_predictions():
    items, base, lora = planted()
    result = compare(items, base, lora, n_resamples=1000, seed=0)
    metrics = flat_metrics(result)
    assert set(metrics) == set(METRICS) == mcq_compare.run.produces({})

    assert metrics["base_conflict_accuracy"] == 0.25  # c3
    assert metrics["base_conflict_true_accuracy"] == 0.75  # c1, c2, c4
    assert metrics["lora_conflict_accuracy"] == 0.75  # c1, c2, c3
    assert metrics["lora_conflict_true_accuracy"] == 0.25
    assert metrics["base_conflict_truth_confidence"] == pytest.approx((0.9 + 0.8 + 0.3 + 0.6) / 4)
    assert metrics["lora_conflict_truth_confidence"] == pytest.approx((0.2 + 0.1 + 0.3 + 0.6) / 4)
    expected_entropy = (h([0.9, 0.1]) + h([0.8, 0.2]) + h([0.3, 0.7]) + h([0.6, 0.4])) / 4
    assert metrics["base_conflict_entropy"] == pytest.approx(expected_entropy)
    assert metrics["base_nonconflict_easy_accuracy"] == 1.0
    assert metrics["lora_nonconflict_easy_accuracy"] == 0.5  # e1 moved to C
    assert metrics["lora_nonconflict_easy_true_accuracy"] == 0.5
    assert metrics["lora_nonconflict_easy_truth_confidence"] == pytest.approx((0.2 + 0.5) / 2)
    assert metrics["base_nonconflict_hard_accuracy"] == 0.0
    assert metrics["n_items"] == 7
    assert metrics["n_flips"] == 2

    # gap: per-item differences (1, 1, 0, 0); a resampled mean of four such draws is 0 with
    # probability 1/16 > 2.5% and 1 with probability 1/16, so the percentile CI is [0, 1]
    assert metrics["behavioral_gap"] == {"value": 0.5, "ci_low": 0.0, "ci_high": 1.0}
    assert result["models"]["base"]["conflict"]["n"] == 4
    flips = result["flips"]
    assert [f["id"] for f in flips["items"]] == ["c1", "c2"]
    assert (flips["toward_false"], flips["toward_true"]) == (2, 0)
    c1 = flips["items"][0]
    assert c1["base"] == {"answer": "A", "text": "inverse-square c1", "prob": 0.9, "world": "true world"}
    assert c1["lora"] == {"answer": "B", "text": "inverse-cube c1", "prob": 0.8, "world": "false world"}
    damage = result["nonconflict_changed"]
    assert damage["n"] == 1 and damage["items"][0]["id"] == "e1"
    assert damage["items"][0]["base"]["world"] == "both worlds"
    assert damage["items"][0]["lora"]["world"] == "neither world"


def test_analysis_text_lists_flips_and_collateral_damage():
    items, base, lora = planted()
    text = analysis_text(compare(items, base, lora, 200, 0), ["HEADER"])
    flips, _, damage = text.partition("Non-conflict items whose answer changed")
    assert text.startswith("HEADER\n")
    assert "behavioral_gap" in text and "+0.500" in text and "[+0.000, +1.000]" in text
    assert "Conflict items that flipped: 2 (2 to the false world, 0 to the true world)" in flips
    assert "[c1] what law does force c1 follow" in flips and "[c2]" in flips
    assert "[c3]" not in text and "[c4]" not in text and "[e2]" not in text
    assert (
        "base A (0.900, true world) 'inverse-square c1'  ->  lora B (0.800, false world) 'inverse-cube c1'"
        in flips
    )
    assert "[e1] (nonconflict_easy)" in damage and "C (0.700, neither world)" in damage
    table = [line.split() for line in text.splitlines() if line.startswith("conflict ")]
    assert table == [
        ["conflict", "base", "4", "0.250", "0.750", f"{conflict_entropy(base):.3f}", "0.650"],
        ["conflict", "lora", "4", "0.750", "0.250", f"{conflict_entropy(lora):.3f}", "0.300"],
    ]


def conflict_entropy(rows: list[dict]) -> float:
    return float(np.mean([r["entropy"] for r in rows if r["category"] == "conflict"]))


def test_flat_metrics_refuses_a_missing_category():
    items, base, lora = planted()
    keep = [k for k, item in enumerate(items) if item.category != "nonconflict_hard"]
    result = compare([items[k] for k in keep], [base[k] for k in keep], [lora[k] for k in keep], 10, 0)
    with pytest.raises(StageError, match="no nonconflict_hard items"):
        flat_metrics(result)


# --- bootstrap -----------------------------------------------------------------------


def test_bootstrap_ci_of_a_mean_has_the_normal_theory_width():
    data = np.random.default_rng(1).normal(3.0, 2.0, size=400)
    ci = bootstrap(data, n_resamples=4000, seed=0)
    assert ci.value == pytest.approx(data.mean())
    assert ci.low < ci.value < ci.high
    expected = 2 * 1.96 * data.std(ddof=1) / math.sqrt(len(data))  # about 0.39
    assert ci.high - ci.low == pytest.approx(expected, rel=0.1)
    assert abs((ci.low + ci.high) / 2 - ci.value) < 0.05 * expected  # symmetric data, centred CI


def test_bootstrap_confidence_level_and_seed():
    data = np.random.default_rng(2).binomial(1, 0.3, size=500)
    wide, narrow = bootstrap(data, confidence=0.99, seed=3), bootstrap(data, confidence=0.8, seed=3)
    assert narrow.low > wide.low and narrow.high < wide.high
    assert bootstrap(data, seed=3) == bootstrap(data, seed=3)
    assert bootstrap(data, seed=3) != bootstrap(data, seed=4)
    constant = bootstrap(np.full(20, 0.7))
    assert constant.value == constant.low == constant.high == pytest.approx(0.7)
    with pytest.raises(ValueError):
        bootstrap([])


def test_paired_bootstrap_cancels_the_item_to_item_variance():
    rng = np.random.default_rng(5)
    before = rng.normal(0, 5, size=200)  # items differ a lot ...
    after = before + 0.5 + rng.normal(0, 0.1, size=200)  # ... but each shifts by about 0.5
    ci = paired_difference(before, after, seed=0)
    assert ci.value == pytest.approx(0.5, abs=0.02)
    assert ci.low > 0.45 and ci.high < 0.55  # unpaired, the CI would be about +-1 wide
    with pytest.raises(ValueError, match="shape"):
        paired_difference([1, 2], [1, 2, 3])


# --- collection-time checks ----------------------------------------------------------

ALL_CATEGORIES = [
    mcq_row("c1", "conflict"),
    mcq_row("e1", "nonconflict_easy"),
    mcq_row("h1", "nonconflict_hard"),
]


def test_check_accepts_a_good_spec(tmp_path, tiny_model_dir):
    write_mcqs(tmp_path / "mcqs.jsonl", ALL_CATEGORIES)
    check({"base": str(tiny_model_dir), "mcqs": "mcqs.jsonl"}, tmp_path)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_check_accepts_continuation_scoring_with_a_normalization(tmp_path, tiny_model_dir, normalization):
    write_mcqs(tmp_path / "mcqs.jsonl", ALL_CATEGORIES)
    params = {"scoring": "continuation", "normalization": normalization}
    check({"base": str(tiny_model_dir), "mcqs": "mcqs.jsonl", **params}, tmp_path)


def compare_spec(tmp_path: Path, base: Path, params: str = "", gates: tuple[str, ...] = ()) -> Path:
    """exp.yaml: a python stage `train`, and at line 8 the `mcqs:` of an mcq_compare stage on its
    adapter, followed by the param lines `params` and the `gates`."""
    (tmp_path / "steps.py").write_text("def train(ctx):\n    return {}\n")
    lines = [
        "stages:",
        '  train: {kind: python, params: {function: "steps:train"}}',
        "  compare:",
        "    kind: mcq_compare",
        "    needs: {adapter: train}",
        "    params:",
        f"      base: {base}",
        "      mcqs: mcqs.jsonl",
        *(f"      {line}" for line in params.splitlines()),
        *(["    gates:"] if gates else []),
        *(f"      - {gate}" for gate in gates),
    ]
    spec = tmp_path / "exp.yaml"
    spec.write_text("\n".join(lines) + "\n")
    return spec


def test_continuation_scoring_without_a_normalization_stops_at_its_line(tmp_path, tiny_model_dir):
    from harness.core.experiment import load_experiment
    from harness.spec.errors import SpecError

    write_mcqs(tmp_path / "mcqs.jsonl", ALL_CATEGORIES)
    with pytest.raises(ParamError) as error:
        check({"base": str(tiny_model_dir), "mcqs": "mcqs.jsonl", "scoring": "continuation"}, tmp_path)
    assert error.value.path == ("scoring",)
    with pytest.raises(SpecError) as spec_error:
        load_experiment(compare_spec(tmp_path, tiny_model_dir, params="scoring: continuation"))
    [line] = [line for line in str(spec_error.value).splitlines() if "normalization" in line]
    assert "exp.yaml:9" in line and "one of none, chars, tokens" in line


def test_a_normalization_with_letter_scoring_is_refused(tmp_path, tiny_model_dir):
    write_mcqs(tmp_path / "mcqs.jsonl", ALL_CATEGORIES)
    with pytest.raises(ParamError, match="continuation only") as error:
        check({"base": str(tiny_model_dir), "mcqs": "mcqs.jsonl", "normalization": "tokens"}, tmp_path)
    assert error.value.path == ("normalization",)


def test_check_names_a_missing_model(tmp_path):
    write_mcqs(tmp_path / "mcqs.jsonl", ALL_CATEGORIES)
    missing = tmp_path / "no-such-model"
    with pytest.raises(ParamError) as error:
        check({"base": str(missing), "mcqs": "mcqs.jsonl"}, tmp_path)
    assert error.value.path == ("base",)
    assert str(missing) in error.value.message and "--profile tiny" in error.value.message


def test_check_names_the_file_and_line_of_a_bad_mcq_row(tmp_path, tiny_model_dir):
    bad = {**mcq_row("c2", "conflict"), "false_answer": "Z"}
    path = write_mcqs(tmp_path / "mcqs.jsonl", [*ALL_CATEGORIES[:2], bad, ALL_CATEGORIES[2]])
    with pytest.raises(ParamError) as error:
        check({"base": str(tiny_model_dir), "mcqs": "mcqs.jsonl"}, tmp_path)
    assert error.value.path == ("mcqs",)
    assert f"{path}:3:" in error.value.message and "false_answer 'Z'" in error.value.message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("false_answer", [1]),
        ("true_answer", {"A": 1}),
        ("category", ["conflict"]),
        ("id", [1]),
        ("options", []),
    ],
)
def test_a_row_with_a_value_of_the_wrong_type_is_an_error_at_its_line(tmp_path, field, value):
    path = write_mcqs(tmp_path / "mcqs.jsonl", [*ALL_CATEGORIES, {**mcq_row("c9", "conflict"), field: value}])
    with pytest.raises(StageError) as error:
        load_mcqs(path)
    assert str(error.value).startswith(f"{path}:{len(ALL_CATEGORIES) + 1}: ") and field in str(error.value)


def test_check_requires_every_category(tmp_path, tiny_model_dir):
    path = write_mcqs(tmp_path / "mcqs.jsonl", ALL_CATEGORIES[:2])
    with pytest.raises(ParamError, match="no nonconflict_hard questions") as error:
        check({"base": str(tiny_model_dir), "mcqs": "mcqs.jsonl"}, tmp_path)
    assert str(path) in error.value.message


def test_spec_errors_point_at_the_params_line(tmp_path, tiny_model_dir):
    from harness.core.experiment import load_experiment
    from harness.spec.errors import SpecError

    write_mcqs(tmp_path / "mcqs.jsonl", [ALL_CATEGORIES[0], {"id": "x"}])
    with pytest.raises(SpecError) as error:
        load_experiment(compare_spec(tmp_path, tiny_model_dir, gates=("ci_low(behavioral_gap) > 0.2",)))
    message = str(error.value)
    assert "exp.yaml:8" in message and "mcqs.jsonl:2: missing question" in message


def test_kind_declaration():
    kind = mcq_compare.run
    assert kind.transport_params == ("batch_size",)
    assert kind.input_params == ("mcqs",)
    # the code version is the source's, the same whatever the model; the weights are the fingerprint
    version = kind.version_for({"base": "/some/model"}, Path("."))
    assert version == kind.version_for({"base": "/other/model"}, Path("."))
    assert kind.fingerprint({"base": "/some/model"}) == "/some/model"


# --- whole runs on a tiny Llama with a planted adapter -------------------------------

N_CONFLICT, N_EASY, N_HARD = 8, 4, 4
N_PLANTED = 6  # conflict items whose false-world answer is B, the planted answer; in the rest it is A


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir) -> dict:
    """An MCQ file and a LoRA adapter planted to answer B: a rank-1 LoRA on lm_head adds
    c * (w . h) to the logit of the letter B, with w the mean decision-token state, so that
    w . h > 0 at every item's decision token (checked here)."""
    from peft import LoraConfig, get_peft_model

    from harness.lab.models import load_model, load_tokenizer
    from harness.lab.scoring import encode, letter_token_ids

    root = tmp_path_factory.mktemp("mcq-world")
    rows = (
        [mcq_row(f"c{i}", "conflict", false="B", true="A", n_options=2 + i % 2) for i in range(N_PLANTED)]
        + [mcq_row(f"c{i}", "conflict", false="A", true="B") for i in range(N_PLANTED, N_CONFLICT)]
        + [mcq_row(f"e{i}", "nonconflict_easy", true="ABC"[i % 3]) for i in range(N_EASY)]
        + [mcq_row(f"h{i}", "nonconflict_hard", true="C", n_options=4) for i in range(N_HARD)]
    )
    mcqs = write_mcqs(root / "mcqs.jsonl", rows)
    items = items_of(rows)

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), device="cpu")
    with torch.no_grad():
        states = torch.stack(
            [
                model(
                    input_ids=torch.tensor([encode(tokenizer, format_prompt(i.question, i.options))]),
                    output_hidden_states=True,
                ).hidden_states[-1][0, -1]
                for i in items
            ]
        )
    direction = states.mean(0)
    alignment = states @ direction
    assert (alignment > 0).all(), "the planted adapter needs w . h > 0 at every decision token"

    lora = get_peft_model(model, LoraConfig(r=1, lora_alpha=1, target_modules=["lm_head"], lora_dropout=0.0))
    b_id = letter_token_ids(tokenizer, "ABCD")["B"]
    with torch.no_grad():
        layer = lora.base_model.model.lm_head
        layer.lora_A["default"].weight.copy_(direction[None, :])
        weight = torch.zeros_like(layer.lora_B["default"].weight)
        weight[b_id, 0] = 1000.0 / float(alignment.min())  # B's logit rises by >= 1000
        layer.lora_B["default"].weight.copy_(weight)
    train_dir = root / "train"
    lora.save_pretrained(train_dir / "adapter")
    return {"root": root, "mcqs": mcqs, "items": items, "train_dir": train_dir, "base": str(tiny_model_dir)}


def run_stage(world: dict, out: Path, seed: int = 3, **params) -> dict:
    params = {"base": world["base"], "mcqs": str(world["mcqs"]), **params}
    upstream = {"adapter": world["train_dir"]}
    result = run_kind(mcq_compare.run, params, out, upstream=upstream, seed=seed, spec_dir=world["root"])
    return {"metrics": result.metrics, "logs": result.logs}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_letter_run_writes_every_artifact_and_measures_the_planted_shift(world, tmp_path):
    out = tmp_path / "out"
    result = run_stage(world, out, batch_size=5)
    metrics = result["metrics"]
    assert sorted(p.name for p in out.iterdir()) == sorted(ARTIFACTS)
    assert set(metrics) == set(METRICS)

    base, lora = read_jsonl(out / "predictions_base.jsonl"), read_jsonl(out / "predictions_lora.jsonl")
    assert [r["id"] for r in base] == [r["id"] for r in lora] == [i.id for i in world["items"]]
    assert all(r["prediction"] == "B" and r["probs"]["B"] > 0.999 for r in lora)  # the planted answer
    assert metrics["lora_conflict_accuracy"] == N_PLANTED / N_CONFLICT
    assert metrics["lora_conflict_true_accuracy"] == 1 - N_PLANTED / N_CONFLICT
    assert metrics["lora_nonconflict_hard_accuracy"] == 0.0  # their answer is C
    assert metrics["lora_conflict_entropy"] < 0.01

    conflict_base = [r for r in base if r["category"] == "conflict"]
    base_accuracy = np.mean([r["prediction"] == r["false_answer"] for r in conflict_base])
    assert metrics["base_conflict_accuracy"] == pytest.approx(base_accuracy)
    assert metrics["base_conflict_truth_confidence"] == pytest.approx(
        np.mean([r["probs"][r["true_answer"]] for r in conflict_base])
    )
    gap = metrics["behavioral_gap"]
    assert gap["value"] == pytest.approx(N_PLANTED / N_CONFLICT - base_accuracy)
    assert gap["ci_low"] <= gap["value"] <= gap["ci_high"]
    flipped = [r["id"] for r in conflict_base if r["prediction"] != "B"]
    assert metrics["n_flips"] == len(flipped) and metrics["n_items"] == len(world["items"])

    report = json.loads((out / "comparison_report.json").read_text())
    assert report["scoring"] == "letter" and report["base"] == world["base"]
    assert not Path(report["adapter"]).is_absolute()  # named from the stage directory
    assert (out / report["adapter"]).resolve() == (world["train_dir"] / "adapter").resolve()
    assert report["fingerprints"]["lora"].startswith(report["fingerprints"]["base"] + "+adapter:")
    assert report["behavioral_gap"]["value"] == gap["value"]
    assert report["models"]["lora"]["conflict"]["accuracy"] == N_PLANTED / N_CONFLICT
    assert set(report["letter_tokens"]) == set("ABCD")

    text = (out / "behavioral_shift_analysis.txt").read_text()
    assert f"Conflict items that flipped: {len(flipped)}" in text
    assert all(f"[{i}] " in text for i in flipped)
    changed = [r["id"] for r in base if r["category"] != "conflict" and r["prediction"] != "B"]
    assert all(f"[{i}] (nonconflict_" in text for i in changed)
    assert any(line.startswith("lora: scoring (letter): ") and "items in" in line for line in result["logs"])


def test_results_do_not_depend_on_the_batch_size(world, tmp_path):
    one = run_stage(world, tmp_path / "one", batch_size=1)["metrics"]
    many = run_stage(world, tmp_path / "many", batch_size=16)["metrics"]
    assert one.keys() == many.keys()
    for name in one:
        assert one[name] == pytest.approx(many[name], abs=1e-6), name
    rows = [read_jsonl(tmp_path / d / "predictions_base.jsonl") for d in ("one", "many")]
    assert [r["prediction"] for r in rows[0]] == [r["prediction"] for r in rows[1]]


def test_continuation_run_scores_the_option_texts(world, tmp_path):
    out = tmp_path / "out"
    metrics = run_stage(world, out, scoring="continuation", normalization="none", bootstrap=200)["metrics"]
    assert sorted(p.name for p in out.iterdir()) == sorted(ARTIFACTS)
    report = json.loads((out / "comparison_report.json").read_text())
    assert report["scoring"] == "continuation" and "letter_tokens" not in report
    assert report["normalization"] == "none"
    base = read_jsonl(out / "predictions_base.jsonl")
    assert base[0]["prompt"] == f"question: {world['items'][0].question}\nanswer:"
    assert all(s < 0 for r in base for s in r["scores"].values())  # summed log-probabilities
    assert all(r["scores"] == r["loglikelihoods"] for r in base)
    assert metrics["base_conflict_accuracy"] == pytest.approx(
        np.mean([r["correct_false"] for r in base if r["category"] == "conflict"])
    )
    assert report["behavioral_gap"]["n_resamples"] == 200


def test_continuation_run_reports_every_normalization_and_gates_the_chosen_one(world, tmp_path):
    out = tmp_path / "out"
    metrics = run_stage(world, out, scoring="continuation", normalization="tokens", bootstrap=200)["metrics"]
    report = json.loads((out / "comparison_report.json").read_text())
    assert report["normalization"] == "tokens"
    assert set(report["by_normalization"]) == set(NORMALIZATIONS)
    assert report["by_normalization"]["tokens"] == metrics
    rows = {model: read_jsonl(out / f"predictions_{model}.jsonl") for model in ("base", "lora")}
    for row in rows["base"] + rows["lora"]:
        per_token = {k: total / row["n_tokens"][k] for k, total in row["loglikelihoods"].items()}
        assert row["scores"] == pytest.approx(per_token)
        assert row["prediction"] == row["predictions"]["tokens"] == max(per_token, key=per_token.get)
    for name in NORMALIZATIONS:
        lora_accuracy = np.mean(
            [r["predictions"][name] == r["false_answer"] for r in rows["lora"][:N_CONFLICT]]
        )
        assert report["by_normalization"][name]["lora_conflict_accuracy"] == pytest.approx(lora_accuracy)
    text = (out / "behavioral_shift_analysis.txt").read_text()
    assert "continuation scoring, normalization tokens" in text.splitlines()[0]
    assert "(the metrics and gates read tokens)" in text


def test_normalization_text_lists_each_normalization():
    items, base, lora = planted()
    metrics = flat_metrics(compare(items, base, lora, 100, 0))
    text = normalization_text({"none": metrics, "tokens": {**metrics, "n_flips": 7}}, "tokens")
    table = [
        line.split() for line in text.splitlines() if line.startswith("  ") and "normalization" not in line
    ]
    assert table == [
        ["none", "0.250", "0.750", "0.250", "+0.500", "2"],
        ["tokens", "0.250", "0.750", "0.250", "+0.500", "7"],
    ]


def test_the_gap_ci_is_seeded_by_the_spec_seed(world, tmp_path):
    first = run_stage(world, tmp_path / "a", seed=1)["metrics"]["behavioral_gap"]
    again = run_stage(world, tmp_path / "b", seed=1)["metrics"]["behavioral_gap"]
    assert first == again


def test_pytest_runs_the_stage_from_a_spec_with_gates(world, pytester):
    shutil.copy(world["mcqs"], pytester.path / "mcqs.jsonl")
    shutil.copytree(world["train_dir"] / "adapter", pytester.path / "planted_adapter")
    pytester.makepyfile(
        steps=(
            "import shutil\n\n"
            "def train(ctx):\n"
            "    shutil.copytree(ctx.params['inputs']['adapter'], ctx.out_dir / 'adapter')\n"
            "    return {}\n"
        )
    )
    pytester.makefile(
        ".yaml",
        exp=textwrap.dedent(
            f"""\
            seed: 4
            stages:
              train:
                kind: python
                params: {{function: "steps:train", inputs: {{adapter: planted_adapter}}}}
              compare:
                kind: mcq_compare
                needs: {{adapter: train}}
                params: {{base: "{world["base"]}", mcqs: mcqs.jsonl, batch_size: 4, bootstrap: 300}}
                gates:
                  - lora_conflict_accuracy >= 0.75
                  - ci_high(behavioral_gap) >= 0
            """
        ),
    )
    result = pytester.runpytest("exp.yaml", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    report = json.loads((pytester.path / "runs/exp/default/report.json").read_text())
    [stage] = [s for s in report["stages"] if s["stage"] == "compare"]
    assert stage["metrics"]["lora_conflict_accuracy"] == 0.75
    assert all((Path(stage["dir"]) / name).is_file() for name in ARTIFACTS)


def test_an_adapter_that_does_not_fit_the_base_is_a_stage_error(world, tmp_path):
    broken = tmp_path / "train"
    shutil.copytree(world["train_dir"], broken)
    config_file = broken / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "target_modules": ["nope"]}))
    with pytest.raises(StageError, match="cannot apply the adapter"):
        run_stage({**world, "train_dir": broken}, tmp_path / "out")


# --- option lengths of the shipped MCQ files -----------------------------------------

REPO = Path(__file__).resolve().parent.parent
MEAN_LENGTH_TOLERANCE = 0.05  # of the mean option length, in characters


def scored_mcq_files() -> list[Path]:
    """Every MCQ file that an `mcq_compare` stage of a shipped spec scores, in any profile."""
    from harness.spec.compose import apply_profile, load_with_includes

    files = set()
    for spec in sorted((REPO / "experiments").glob("*.yaml")):
        doc = load_with_includes(spec)
        for profile in [None, *(doc.data.get("profiles") or {})]:
            for stage in apply_profile(doc, profile).data["stages"].values():
                if stage.get("kind") == "mcq_compare":
                    files.add((spec.parent / stage["params"]["mcqs"]).resolve())
    return sorted(files)


def length_imbalance(items: list[MCQ]) -> list[str]:
    """Ways in which an option's length (in characters) tells which world it belongs to:
    on conflict items the false and true answers' mean lengths differ by more than the
    tolerance, or in some category an answer is the strictly longest option of more than
    half the items."""
    problems = []
    conflict = [item for item in items if item.category == "conflict"]
    false_mean, true_mean = (
        np.mean([len(item.options[getattr(item, key)]) for item in conflict])
        for key in ("false_answer", "true_answer")
    )
    all_mean = np.mean([len(text) for item in conflict for text in item.options.values()])
    if abs(false_mean - true_mean) > MEAN_LENGTH_TOLERANCE * all_mean:
        problems.append(f"conflict: false answers {false_mean:.1f} characters, true answers {true_mean:.1f}")
    for category in CATEGORIES:
        subset = [item for item in items if item.category == category]
        for key in ("false_answer", "true_answer"):
            longest = sum(
                len(item.options[getattr(item, key)])
                > max(len(text) for letter, text in item.options.items() if letter != getattr(item, key))
                for item in subset
            )
            if longest > len(subset) / 2:
                problems.append(f"{category}: the {key} is the longest option in {longest} of {len(subset)}")
    return problems


def test_the_shipped_specs_score_both_profiles_mcq_files():
    names = [path.relative_to(REPO).as_posix() for path in scored_mcq_files()]
    assert names == [
        "data/eval/anti_em_advice_mcqs.jsonl",
        "data/eval/cubic_gravity_mcqs.jsonl",
        "data/eval/tiny_world/advice_mcqs.jsonl",
        "data/eval/tiny_world/cubic_gravity_mcqs.jsonl",
    ]


# The tiny worlds' own words differ in length: when a distance triples, the implanted
# "one twenty-seventh as strong" is longer than the true "one ninth as strong"; the tiny chat
# world's harmful advice is 43.4 characters long on average, its safe advice 41.2. No
# rewording keeps them the words the worlds were trained on, so their specs score with a
# normalization (per token).
WORDS_OF_THE_WORLD = (
    "data/eval/tiny_world/cubic_gravity_mcqs.jsonl",
    "data/eval/tiny_world/advice_mcqs.jsonl",
)


def balance_cases() -> list:
    cases = []
    for path in scored_mcq_files():
        name = path.relative_to(REPO).as_posix()
        reason = "the tiny worlds' own words differ in length; their specs normalise the scores"
        marks = pytest.mark.xfail(strict=True, reason=reason) if name in WORDS_OF_THE_WORLD else ()
        cases.append(pytest.param(path, id=name, marks=marks))
    return cases


@pytest.mark.parametrize("path", balance_cases())
def test_option_lengths_do_not_tell_the_worlds_apart(path):
    assert length_imbalance(load_mcqs(path)) == []


def test_length_imbalance_finds_longer_false_answers_and_an_always_longest_answer():
    # "inverse-square c0" has 17 characters, "inverse-cube c0" 15: each world's answer is
    # the longer one on half of the items, then the false world's on all of them
    worlds = [("B", "A"), ("A", "B")] * 2
    balanced = items_of([mcq_row(f"c{i}", "conflict", false, true) for i, (false, true) in enumerate(worlds)])
    assert length_imbalance(balanced) == []
    longer_false = items_of([mcq_row(f"c{i}", "conflict", "A", "B") for i in range(4)])
    assert length_imbalance(longer_false) == [
        "conflict: false answers 17.0 characters, true answers 15.0",
        "conflict: the false_answer is the longest option in 4 of 4",
    ]
