"""Residual hooks and the `steer` stage kind: a planted direction moves the answers the way it
was built to and beyond many random ones of the same norm, only a move the way the spec
claims counts, the direction never sees the items it is judged on, hooks leave no trace, and
the same holds on a PeftModel."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.core.stage import ParamError, StageError, Upstream
from harness.lab.activations import Statement, write_activations
from harness.lab.contrast import contrasts
from harness.lab.hooks import (
    add_to_residual,
    check_alignment,
    contrast_logit_diffs,
    final_norm,
    n_indices,
    record_residuals,
    residual_modules,
)
from harness.lab.mcq import load_mcqs
from harness.stages import steer
from harness.stages.steer import (
    METRICS,
    claimed_effect,
    curve,
    fit_split,
    null_summary,
    resolve_layer,
    slope,
)
from harness.testing import run_kind

MCQS = Path(__file__).resolve().parents[1] / "data" / "eval" / "tiny_world" / "cubic_gravity_mcqs.jsonl"
PROMPT = "the law of gravity says that"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, save_adapter) -> dict:
    from harness.lab.models.base import load_model, load_tokenizer

    root = tmp_path_factory.mktemp("steer-world")
    base = str(tiny_model_dir)
    train_dir = save_adapter(base, root / "train", std=0.05)
    tokenizer = load_tokenizer(base)
    peft_model = load_model(base, train_dir / "adapter", device="cpu")
    items = contrasts(tokenizer, load_mcqs(MCQS), "continuation")
    return {
        "root": root,
        "base": base,
        "train_dir": train_dir,
        "tokenizer": tokenizer,
        "plain": load_model(base, device="cpu"),
        "peft": peft_model,
        "items": items,
        "activations_dir": write_planted_activations(root / "activations", peft_model, items),
    }


def ids_of(world: dict, text: str) -> torch.Tensor:
    return torch.tensor([world["tokenizer"](text)["input_ids"]])


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def unembedding_difference(model, items) -> torch.Tensor:
    """Mean over items of W_U[true] - W_U[false], checked to have a positive dot product with
    each item's own: added at the last index (the last block's output, which only the final
    norm separates from the unembedding) it raises the true tokens' logits."""
    weight = model.get_output_embeddings().weight.detach()
    per_item = torch.stack([weight[c.true_id] - weight[c.false_id] for c in items])
    direction = per_item.mean(0)
    assert (per_item @ direction > 0).all(), "the planted direction must favour every item's true token"
    return direction


# --- hooks ---------------------------------------------------------------------------


def test_hooked_modules_are_the_hidden_states_on_plain_and_peft_models(world):
    ids = ids_of(world, PROMPT)
    check_alignment(world["plain"], ids)
    check_alignment(world["peft"], ids)
    with world["peft"].disable_adapter():
        check_alignment(world["peft"], ids)
    n_layers = world["plain"].config.num_hidden_layers
    assert n_indices(world["plain"]) == n_indices(world["peft"]) == n_layers + 1
    # the peft model's modules are its own (the blocks with the LoRA layers inside)
    assert residual_modules(world["peft"])[1] is world["peft"].get_base_model().model.layers[0]


def test_a_vector_is_added_at_every_position_and_the_hook_is_removed(world):
    model, ids = world["peft"], ids_of(world, PROMPT)
    vector = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    before = logits(model, ids)
    with add_to_residual(model, 2, vector), record_residuals(model, [2]) as steered:
        during = logits(model, ids)
    with record_residuals(model, [2]) as plain:
        after = logits(model, ids)
    assert torch.allclose(steered[2] - plain[2], vector.expand_as(plain[2]), atol=1e-5)  # every position
    assert not torch.allclose(during, before, atol=1e-3)
    assert torch.equal(after, before)  # nothing left behind

    with pytest.raises(RuntimeError, match="boom"), add_to_residual(model, 2, vector):
        raise RuntimeError("boom")
    assert torch.equal(logits(model, ids), before)  # removed on an exception too
    with pytest.raises(IndexError, match="out of range"), add_to_residual(model, 99, vector):
        pass


def test_a_zero_vector_is_the_unsteered_model(world):
    model, ids = world["plain"], ids_of(world, PROMPT)
    unsteered = logits(model, ids)
    for index in range(n_indices(model)):
        with add_to_residual(model, index, torch.zeros(model.config.hidden_size)):
            assert torch.equal(logits(model, ids), unsteered)


def test_the_last_index_is_the_last_blocks_output_before_the_final_norm(world):
    """Steering the last index of a PeftModel gives exactly lm_head(final_norm(h + v)), h the
    unsteered last block's output: the vector enters the raw residual, before the norm."""
    model, ids = world["peft"], ids_of(world, PROMPT)
    last = n_indices(model) - 1
    vector = 3 * unembedding_difference(model, world["items"])
    with record_residuals(model, [last]) as plain:
        logits(model, ids)
    with add_to_residual(model, last, vector):
        steered = logits(model, ids)
    with torch.no_grad():
        expected = model.get_output_embeddings()(final_norm(model)(plain[last] + vector))
    assert torch.allclose(steered, expected, atol=1e-4)


def test_generation_is_steered_at_every_new_token(world):
    model, tokenizer = world["peft"], world["tokenizer"]
    push = 1000 * model.get_output_embeddings().weight[tokenizer(" gravity")["input_ids"][-1]].detach()
    with torch.no_grad():  # the token this push makes win, whatever the residual it is added to
        winner = int(model.get_output_embeddings()(final_norm(model)(push)).argmax())
    with add_to_residual(model, n_indices(model) - 1, push):
        text = steer._generate(model, tokenizer, PROMPT, False, 5)
    assert text == tokenizer.decode([winner] * 5)  # the prompt's last position and each new one
    assert steer._generate(model, tokenizer, PROMPT, False, 5) != text


# --- pure parts ----------------------------------------------------------------------


def test_curve_and_slope():
    rows = curve([-1.0, 0.0, 1.0], {-1.0: [-2.0, 0.0], 0.0: [0.0, 0.0], 1.0: [2.0, 0.0]})
    assert [r["logit_diff"] for r in rows] == [-1.0, 0.0, 1.0]
    assert rows[1]["true_prob"] == 0.5
    assert rows[2]["true_prob"] == pytest.approx((1 / (1 + np.exp(-2)) + 0.5) / 2)
    assert slope([0, 1, 2], [1, 3, 5]) == pytest.approx(2.0)
    assert np.isnan(slope([1, 1], [0, 1]))


def test_the_effect_counts_only_moves_the_claimed_way():
    multipliers, probs = [-2.0, -1.0, 0.0, 1.0], [0.3, 0.45, 0.5, 0.8]
    assert claimed_effect(multipliers, probs, "increase") == pytest.approx(0.3)  # up at +1
    # claimed down: +1 moves the wrong way, -1 and -2 too (down at a negative multiplier)
    assert claimed_effect(multipliers, probs, "decrease") == pytest.approx(-0.05)
    assert claimed_effect([-1.0, 0.0, 1.0], [0.9, 0.5, 0.1], "increase") == pytest.approx(-0.4)


def test_the_null_gives_a_p_value_and_margins():
    null = [0.1, 0.3, 0.5, 0.0]
    summary = null_summary(0.3, null)
    assert summary["p_value"] == pytest.approx(3 / 5)  # 0.3 and 0.5 reach it, plus one
    assert summary["random_effect_mean"] == pytest.approx(0.225)
    assert summary["random_effect_q95"] == pytest.approx(np.quantile(null, 0.95))
    assert summary["effect_minus_random"] == pytest.approx(0.075)
    assert summary["effect_minus_random_q95"] == pytest.approx(0.3 - np.quantile(null, 0.95))
    assert null_summary(0.6, null)["p_value"] == pytest.approx(1 / 5)


def test_statements_restating_a_steering_item_are_held_out_with_their_group():
    [item] = [m for m in load_mcqs(MCQS) if m.id == "gravity-0-doubles"]
    metadata = [
        {
            "id": "a-true",
            "group": "a",
            "text": "Question: Is it true that WHEN the distance between two "
            "planets doubles, the gravity between them becomes one quarter as strong?\nanswer:",
        },
        {"id": "a-false", "group": "a", "text": "a contrary in other words"},
        {"id": "gravity-0-doubles", "group": "b", "text": "unrelated words, the same id"},
        {"id": "c-true", "group": "c", "text": "question: is it true that the vilbe eats wild honey?"},
        {"id": "loose", "text": "the distance between two planets"},  # within the item's words: held out
        {"id": "other", "text": "question: is it true that the sky is green?"},
    ]
    fit, held = fit_split(metadata, [item])
    assert fit == [3, 5]
    assert held == ["a-true", "a-false", "gravity-0-doubles", "loose"]


def test_layer_resolution():
    assert resolve_layer(2, {}) == 2
    assert resolve_layer("best", {"best_layer": 3}) == 3
    assert resolve_layer("best", {"best_layer": {"value": 1, "ci_low": 0, "ci_high": 2}}) == 1
    for bad in ({}, {"best_layer": None}, {"best_layer": 1.5}, {"best_layer": True}):
        with pytest.raises(StageError, match="best_layer"):
            resolve_layer("best", bad)


def test_check_at_collection(tmp_path, tiny_model_dir):
    steer.run.check({"base": str(tiny_model_dir), "mcqs": str(MCQS)}, tmp_path)
    with pytest.raises(ParamError, match="MCQ file not found"):
        steer.run.check({"base": str(tiny_model_dir), "mcqs": "nope.jsonl"}, tmp_path)
    easy = [json.loads(line) for line in MCQS.read_text().splitlines() if '"conflict"' not in line]
    (tmp_path / "easy.jsonl").write_text("".join(json.dumps(row) + "\n" for row in easy))
    with pytest.raises(ParamError, match="no conflict questions"):
        steer.run.check({"base": str(tiny_model_dir), "mcqs": "easy.jsonl"}, tmp_path)
    with pytest.raises(ParamError, match="--profile tiny"):
        steer.run.check({"base": str(tmp_path / "gone"), "mcqs": str(MCQS)}, tmp_path)


# --- the stage -----------------------------------------------------------------------

N_FACTS = 12  # groups of a true and a false statement that restate no steering item


def write_planted_activations(path: Path, model, items) -> Path:
    """An activations directory, the same at every layer: statements with `truth` 1 lie along
    the planted direction (which favours the true tokens) and those with 0 against it; the
    statements restating a steering item lie the other way, five times as far, so a direction
    fit on them too would point against the true tokens. `falsehood` is 1 - `truth`;
    `constant` is 1 everywhere."""
    planted = unembedding_difference(model, items).numpy()
    planted /= np.linalg.norm(planted)
    rng = np.random.default_rng(0)
    statements, rows = [], []

    def add(sid: str, text: str, group: str, truth: int, along: float) -> None:
        labels = {"truth": truth, "falsehood": 1 - truth, "constant": 1}
        statements.append(Statement(sid, text, "planted", labels, group))
        rows.append(along * planted + 0.05 * rng.normal(size=planted.shape))

    for k in range(N_FACTS):
        add(f"fact-{k}-true", f"question: is it true that fact {k} holds?\nanswer:", f"fact-{k}", 1, 1.0)
        add(f"fact-{k}-false", f"question: is it true that fact {k} fails?\nanswer:", f"fact-{k}", 0, -1.0)
    for c in items:
        true, false = (c.item.options[c.item.true_answer], c.item.options[c.item.false_answer])
        add(f"{c.item.id}-true", f"question: is it true that {c.item.question} {true}?", c.item.id, 1, -5.0)
        add(f"{c.item.id}-false", f"question: is it true that {c.item.question} {false}?", c.item.id, 0, 5.0)
    layers = np.stack(rows)[:, None, :].repeat(n_indices(model), axis=1).astype(np.float32)
    write_activations(path, statements, [layers], "planted")
    return path


def run_stage(world: dict, out: Path, upstream: dict | None = None, seed: int = 5, **params) -> dict:
    last = n_indices(world["plain"]) - 1
    default_upstream = {
        "activations": Upstream("activations", "extract_activations", world["activations_dir"], {}),
        "probe": Upstream("probe", "train_probe", world["root"], {"best_layer": last}),
        "adapter": Upstream("train", "finetune_lora", world["train_dir"], {}),
    }
    params = {
        "base": world["base"],
        "mcqs": str(MCQS),
        "scoring": "continuation",
        "label": "truth",
        "expect": "increase",
        "prompts": [PROMPT],
        "max_new_tokens": 3,
        "n_random": 20,
        **params,
    }
    upstream = default_upstream if upstream is None else upstream
    result = run_kind(steer.run, params, out, upstream=upstream, seed=seed, spec_dir=world["root"])
    report = json.loads((out / "steering.json").read_text())
    return {"metrics": result.metrics, "logs": result.logs, "report": report}


def test_a_planted_direction_moves_the_answers_beyond_many_random_ones(world, tmp_path):
    out = tmp_path / "out"
    result = run_stage(world, out, multipliers=[-10, -5, -2, 2, 5, 10])
    metrics, report = result["metrics"], result["report"]
    assert set(metrics) == set(METRICS) == steer.run.produces({})
    assert sorted(p.name for p in out.iterdir()) == ["generations.jsonl", "steering.json", "steering.png"]
    assert (out / "steering.png").read_bytes().startswith(b"\x89PNG")

    last = n_indices(world["plain"]) - 1
    assert metrics["layer"] == report["layer"] == last  # layer: best, from the probe's metrics
    assert report["multipliers"] == [-10, -5, -2, 0, 2, 5, 10]  # 0 always measured
    probs = [r["true_prob"] for r in report["direction"]]
    assert all(b > a for a, b in zip(probs, probs[1:], strict=False))  # rises with the multiplier
    at_zero = metrics["true_prob_at_zero"]
    assert metrics["effect"] == pytest.approx(max(at_zero - probs[0], probs[-1] - at_zero))
    assert metrics["effect"] > 0.2
    assert metrics["slope"] > 0

    # the null: 20 seeded random directions, each measured at every multiplier
    effects = report["random"]["effects"]
    assert len(effects) == len(set(effects)) == 20
    assert np.asarray(report["random"]["true_prob"]).shape == (20, 7)
    assert all(row[3] == at_zero for row in report["random"]["true_prob"])  # multiplier 0: no hook
    assert max(effects) < metrics["effect"]
    assert metrics["p_value"] == pytest.approx(1 / 21)
    assert metrics["random_effect_q95"] == pytest.approx(np.quantile(effects, 0.95))
    assert metrics["effect_minus_random_q95"] > 0.2
    assert metrics["effect_minus_random"] == pytest.approx(metrics["effect"] - np.mean(effects))

    # the direction was fit on the statements that restate no steering item: with them it
    # would point the other way and the answers would fall with the multiplier
    assert metrics["n_fit_statements"] == report["fit_statements"] == 2 * N_FACTS
    held = {f"{c.item.id}-{kind}" for c in world["items"] for kind in ("true", "false")}
    assert set(report["held_out_statements"]) == held and metrics["n_items"] == len(world["items"])

    # multiplier 0 is the unsteered finetuned model
    unsteered = contrast_logit_diffs(world["peft"], world["tokenizer"], world["items"]).tolist()
    zero = report["direction"][3]
    assert zero["multiplier"] == 0 and zero["item_logit_diff"] == pytest.approx(unsteered, abs=1e-5)
    assert at_zero == pytest.approx(np.mean(1 / (1 + np.exp(-np.array(unsteered)))))

    # the vector: unit direction * multiplier * mean residual norm / sqrt(d)
    assert report["vector_norm_per_unit_multiplier"] == pytest.approx(
        report["mean_residual_norm"] / np.sqrt(report["d_model"])
    )
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [(g["prompt"], g["multiplier"]) for g in generations] == [
        (PROMPT, m) for m in report["multipliers"]
    ]
    assert all(isinstance(g["text"], str) for g in generations)
    assert any("p = " in line for line in result["logs"])


def test_a_direction_toward_the_false_world_does_not_count(world, tmp_path):
    """Toward label 1 of `falsehood` the true answers lose probability: a large move, but
    against the claim `increase`, so the effect is negative and no random direction is
    beaten; claimed as `decrease`, the same move is the effect."""
    multipliers = [-5, 5]
    against = run_stage(world, tmp_path / "a", label="falsehood", multipliers=multipliers)["metrics"]
    probs_moved = against["true_prob_at_zero"] - against["effect"]
    assert against["effect"] < 0 and probs_moved > against["true_prob_at_zero"]
    assert against["p_value"] == 1.0 and against["effect_minus_random_q95"] < 0
    claimed = run_stage(world, tmp_path / "b", label="falsehood", expect="decrease", multipliers=multipliers)
    assert claimed["metrics"]["effect"] > 0.2 and claimed["metrics"]["p_value"] == pytest.approx(1 / 21)


def test_the_random_directions_come_from_the_seed(world, tmp_path):
    one = run_stage(world, tmp_path / "a", multipliers=[-2, 2], scale="unit", n_random=5)
    again = run_stage(world, tmp_path / "b", multipliers=[-2, 2], scale="unit", n_random=5)
    other_seed = run_stage(world, tmp_path / "c", seed=6, multipliers=[-2, 2], scale="unit", n_random=5)
    assert one["report"]["vector_norm_per_unit_multiplier"] == 1.0
    assert again["report"]["random"] == one["report"]["random"]
    assert other_seed["report"]["random"]["effects"] != one["report"]["random"]["effects"]
    assert other_seed["report"]["direction"] == one["report"]["direction"]
    effects, effect = one["report"]["random"]["effects"], one["metrics"]["effect"]
    assert one["metrics"]["p_value"] == pytest.approx((1 + sum(e >= effect for e in effects)) / 6)


def test_use_adapter_false_steers_the_base_model_without_a_probe(world, tmp_path):
    activations = Upstream("activations", "extract_activations", world["activations_dir"], {})
    result = run_stage(
        world, tmp_path / "out", {"activations": activations}, use_adapter=False, layer=2, multipliers=[1, 2]
    )
    base = contrast_logit_diffs(world["plain"], world["tokenizer"], world["items"]).tolist()
    assert result["report"]["adapter"] is None and result["metrics"]["layer"] == 2
    assert result["report"]["direction"][0]["item_logit_diff"] == pytest.approx(base, abs=1e-5)


def test_stage_errors_name_what_is_missing(world, tmp_path):
    activations = Upstream("activations", "extract_activations", world["activations_dir"], {})
    probe = Upstream("probe", "train_probe", world["root"], {"best_layer": 1})
    with pytest.raises(StageError, match="needs the stage that provides its adapter"):
        run_stage(world, tmp_path / "a", {"probe": probe, "activations": activations})
    with pytest.raises(StageError, match="needs the stage that provides its probe"):
        run_stage(world, tmp_path / "b", {"activations": activations}, use_adapter=False)
    with pytest.raises(StageError, match="needs the stage that provides its activations"):
        run_stage(world, tmp_path / "c", {"probe": probe}, use_adapter=False)
    with pytest.raises(StageError, match="wrote no layer_convention.json"):
        run_stage(world, tmp_path / "d", {"activations": probe}, use_adapter=False, layer=1)
    with pytest.raises(StageError, match="layer 9: the activations have layer indices"):
        run_stage(world, tmp_path / "e", use_adapter=False, layer=9)
    with pytest.raises(StageError, match="need both values of label 'constant'"):
        run_stage(world, tmp_path / "f", use_adapter=False, label="constant")
    with pytest.raises(StageError, match="has no label 'color'"):
        run_stage(world, tmp_path / "g", use_adapter=False, label="color")


COPY_STEP = """\
import shutil

def copy(ctx):
    shutil.copytree(ctx.params["inputs"]["source"], ctx.out_dir, dirs_exist_ok=True)
    return {}
"""


def test_a_spec_gates_on_the_claimed_direction(world, pytester):
    """The same gates pass for the direction toward the true answers and fail for the one
    toward the false world, which moves the answers at least as far."""
    import shutil

    shutil.copytree(world["activations_dir"], pytester.path / "planted_activations")
    shutil.copytree(world["train_dir"] / "adapter", pytester.path / "planted_adapter" / "adapter")
    shutil.copy(MCQS, pytester.path / "mcqs.jsonl")
    pytester.makepyfile(steps=COPY_STEP)
    last = n_indices(world["plain"]) - 1
    steer_stage = textwrap.dedent(
        f"""\
          {{name}}:
            kind: steer
            needs: {{{{activations: activations, adapter: train}}}}
            params:
              base: "{world["base"]}"
              mcqs: mcqs.jsonl
              scoring: continuation
              label: {{label}}
              expect: increase
              layer: {last}
              multipliers: [-10, 10]
              n_random: 20
              prompts: []
            gates:
              - p_value < 0.05
              - effect_minus_random_q95 > 0
        """
    )
    spec = textwrap.dedent(
        """\
        seed: 3
        stages:
          activations:
            kind: python
            params: {function: "steps:copy", inputs: {source: planted_activations}}
          train:
            kind: python
            params: {function: "steps:copy", inputs: {source: planted_adapter}}
        """
    )
    for name, label in (("toward_true", "truth"), ("toward_false", "falsehood")):
        spec += textwrap.indent(steer_stage.format(name=name, label=label), "  ")
    pytester.makefile(".yaml", exp=spec)
    result = pytester.runpytest("exp.yaml", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, failed=1)
    report = json.loads((pytester.path / "runs/exp/default/report.json").read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    assert stages["toward_true"]["metrics"]["p_value"] < 0.05
    assert stages["toward_false"]["metrics"]["effect"] < 0
    assert (Path(stages["toward_true"]["dir"]) / "generations.jsonl").read_text() == ""
