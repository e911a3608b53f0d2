"""Residual hooks and the `steer` stage kind: a planted direction moves the answers the way it
was built to, a random one of the same norm does not, hooks leave no trace, and the same holds
on a PeftModel."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from harness.contrast import contrasts
from harness.hooks import (
    add_to_residual,
    check_alignment,
    contrast_logit_diffs,
    final_norm,
    n_indices,
    record_residuals,
    residual_modules,
)
from harness.mcq import load_mcqs
from harness.stage import ParamError, StageContext, StageError, Upstream
from harness.stages import steer
from harness.stages.steer import KIND, METRICS, curve, load_direction, resolve_layer, slope

MCQS = Path(__file__).resolve().parents[1] / "data" / "eval" / "tiny_world" / "cubic_gravity_mcqs.jsonl"
PROMPT = "the law of gravity says that"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, save_adapter) -> dict:
    from harness.models.base import load_model, load_tokenizer

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
        "probe_dir": write_directions(root / "probe", peft_model, items),
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


def test_curve_slope_and_effect():
    rows = curve([-1.0, 0.0, 1.0], {-1.0: [-2.0, 0.0], 0.0: [0.0, 0.0], 1.0: [2.0, 0.0]})
    assert [r["logit_diff"] for r in rows] == [-1.0, 0.0, 1.0]
    assert rows[1]["true_prob"] == 0.5
    assert rows[2]["true_prob"] == pytest.approx((1 / (1 + np.exp(-2)) + 0.5) / 2)
    assert slope([0, 1, 2], [1, 3, 5]) == pytest.approx(2.0)
    assert np.isnan(slope([1, 1], [0, 1]))
    metrics = steer.curve_metrics([-1.0, 0.0, 1.0], rows, rows[::-1], 0.5, 3)
    assert metrics["effect"] == metrics["random_effect"] == pytest.approx(rows[2]["true_prob"] - 0.5)
    assert metrics["slope"] == pytest.approx(-metrics["random_slope"]) and metrics["slope"] > 0
    assert metrics["effect_minus_random"] == 0 and metrics["layer"] == 3


def test_layer_resolution():
    assert resolve_layer(2, {}) == 2
    assert resolve_layer("best", {"best_layer": 3}) == 3
    assert resolve_layer("best", {"best_layer": {"value": 1, "ci_low": 0, "ci_high": 2}}) == 1
    for bad in ({}, {"best_layer": None}, {"best_layer": 1.5}, {"best_layer": True}):
        with pytest.raises(StageError, match="best_layer"):
            resolve_layer("best", bad)


def test_direction_file_errors(tmp_path):
    path = tmp_path / "directions.safetensors"
    with pytest.raises(StageError, match="wrote no directions.safetensors"):
        load_direction(path, "probe", 1)
    save_file(
        {"probe.1": np.array([3.0, 4.0], dtype=np.float32), "probe.2": np.zeros(2, np.float32)}, str(path)
    )
    assert load_direction(path, "probe", 1).tolist() == pytest.approx([0.6, 0.8])  # made unit
    with pytest.raises(StageError, match="no tensor 'mean_diff.1'"):
        load_direction(path, "mean_diff", 1)
    with pytest.raises(StageError, match="norm 0"):
        load_direction(path, "probe", 2)


def test_check_at_collection(tmp_path, tiny_model_dir):
    steer.check({"base": str(tiny_model_dir), "mcqs": str(MCQS)}, tmp_path)
    with pytest.raises(ParamError, match="MCQ file not found"):
        steer.check({"base": str(tiny_model_dir), "mcqs": "nope.jsonl"}, tmp_path)
    easy = [json.loads(line) for line in MCQS.read_text().splitlines() if '"conflict"' not in line]
    (tmp_path / "easy.jsonl").write_text("".join(json.dumps(row) + "\n" for row in easy))
    with pytest.raises(ParamError, match="no conflict questions"):
        steer.check({"base": str(tiny_model_dir), "mcqs": "easy.jsonl"}, tmp_path)
    with pytest.raises(ParamError, match="--profile tiny"):
        steer.check({"base": str(tmp_path / "gone"), "mcqs": str(MCQS)}, tmp_path)


# --- the stage -----------------------------------------------------------------------


def write_directions(path: Path, model, items) -> Path:
    """`probe.{last}` along the planted direction, `mean_diff.{last}` against it (not unit:
    the stage normalizes), and noise at the other indices."""
    path.mkdir(parents=True, exist_ok=True)
    direction = unembedding_difference(model, items).numpy()
    rng = np.random.default_rng(0)
    tensors = {}
    for i in range(n_indices(model)):
        tensors[f"probe.{i}"] = rng.normal(size=direction.shape).astype(np.float32)
        tensors[f"mean_diff.{i}"] = rng.normal(size=direction.shape).astype(np.float32)
    last = n_indices(model) - 1
    tensors[f"probe.{last}"] = (direction / np.linalg.norm(direction)).astype(np.float32)
    tensors[f"mean_diff.{last}"] = (-5 * direction).astype(np.float32)
    save_file(tensors, str(path / "directions.safetensors"))
    return path


def run_stage(world: dict, out: Path, upstream: dict | None = None, seed: int = 5, **params) -> dict:
    out.mkdir(parents=True)
    last = n_indices(world["plain"]) - 1
    default_upstream = {
        "probe": Upstream("probe", "train_probe", world["probe_dir"], {"best_layer": last}),
        "adapter": Upstream("train", "finetune_lora", world["train_dir"], {}),
    }
    logs: list[str] = []
    ctx = StageContext(
        experiment="exp",
        stage="steer",
        params={
            "base": world["base"],
            "mcqs": str(MCQS),
            "scoring": "continuation",
            "prompts": [PROMPT],
            "max_new_tokens": 3,
            **params,
        },
        seed=seed,
        out_dir=out,
        scratch_dir=out / "scratch",
        upstream=default_upstream if upstream is None else upstream,
        spec_file=world["root"] / "exp.yaml",
        profile=None,
        log=logs.append,
    )
    metrics = KIND.run(ctx)
    json.dumps(metrics)  # storable as metrics.json
    return {"metrics": metrics, "logs": logs, "report": json.loads((out / "steering.json").read_text())}


def test_a_planted_direction_moves_the_answers_and_a_random_one_does_not(world, tmp_path):
    out = tmp_path / "out"
    result = run_stage(world, out, multipliers=[-10, -5, -2, 2, 5, 10])
    metrics, report = result["metrics"], result["report"]
    assert set(metrics) == set(METRICS) == KIND.produces({})
    assert sorted(p.name for p in out.iterdir()) == ["generations.jsonl", "steering.json", "steering.png"]
    assert (out / "steering.png").read_bytes().startswith(b"\x89PNG")

    last = n_indices(world["plain"]) - 1
    assert metrics["layer"] == report["layer"] == last  # layer: best, from the probe's metrics
    assert report["multipliers"] == [-10, -5, -2, 0, 2, 5, 10]  # 0 always measured
    probs = [r["true_prob"] for r in report["curves"]["direction"]]
    assert all(b > a for a, b in zip(probs, probs[1:], strict=False))  # rises with the multiplier
    assert metrics["true_prob_max"] == probs[-1] > metrics["true_prob_at_zero"]
    # the model prefers the true tokens already: the largest move is down, at -10
    assert metrics["effect"] == pytest.approx(metrics["true_prob_at_zero"] - probs[0])
    assert metrics["effect"] > 0.2
    assert metrics["slope"] > 0
    assert metrics["random_effect"] < 0.3 * metrics["effect"]
    assert abs(metrics["random_slope"]) < 0.3 * metrics["slope"]
    assert metrics["effect_minus_random"] == pytest.approx(metrics["effect"] - metrics["random_effect"])

    # multiplier 0 is the unsteered finetuned model
    unsteered = contrast_logit_diffs(world["peft"], world["tokenizer"], world["items"]).tolist()
    zero = report["curves"]["direction"][3]
    assert zero["multiplier"] == 0 and zero["item_logit_diff"] == pytest.approx(unsteered, abs=1e-5)
    assert report["curves"]["random"][3]["item_logit_diff"] == zero["item_logit_diff"]
    assert metrics["true_prob_at_zero"] == pytest.approx(np.mean(1 / (1 + np.exp(-np.array(unsteered)))))

    # the vector: unit direction * multiplier * mean residual norm / sqrt(d)
    assert report["vector_norm_per_unit_multiplier"] == pytest.approx(
        report["mean_residual_norm"] / np.sqrt(report["d_model"])
    )
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [(g["prompt"], g["multiplier"]) for g in generations] == [
        (PROMPT, m) for m in report["multipliers"]
    ]
    assert all(isinstance(g["text"], str) for g in generations)
    assert any("effect" in line for line in result["logs"])


def test_the_other_direction_name_the_scale_and_the_seed(world, tmp_path):
    opposite = run_stage(world, tmp_path / "a", direction="mean_diff", multipliers=[-2, 2], scale="unit")
    probs = [r["true_prob"] for r in opposite["report"]["curves"]["direction"]]
    assert probs[0] > probs[1] > probs[2]  # mean_diff.{last} points against the true tokens
    assert opposite["report"]["vector_norm_per_unit_multiplier"] == 1.0
    again = run_stage(world, tmp_path / "b", direction="mean_diff", multipliers=[-2, 2], scale="unit")
    other_seed = run_stage(
        world, tmp_path / "c", seed=6, direction="mean_diff", multipliers=[-2, 2], scale="unit"
    )
    assert again["report"]["curves"] == opposite["report"]["curves"]
    assert other_seed["report"]["curves"]["random"] != opposite["report"]["curves"]["random"]


def test_use_adapter_false_steers_the_base_model(world, tmp_path):
    probe = Upstream("probe", "train_probe", world["probe_dir"], {})
    result = run_stage(
        world, tmp_path / "out", {"probe": probe}, use_adapter=False, layer=2, multipliers=[1, 2]
    )
    base = contrast_logit_diffs(world["plain"], world["tokenizer"], world["items"]).tolist()
    assert result["report"]["adapter"] is None and result["metrics"]["layer"] == 2
    assert result["report"]["curves"]["direction"][0]["item_logit_diff"] == pytest.approx(base, abs=1e-5)


def test_stage_errors_name_what_is_missing(world, tmp_path):
    probe = Upstream("probe", "train_probe", world["probe_dir"], {"best_layer": 1})
    with pytest.raises(StageError, match="needs the stage that provides its adapter"):
        run_stage(world, tmp_path / "a", {"probe": probe})
    with pytest.raises(StageError, match="needs the stage that provides its probe"):
        run_stage(world, tmp_path / "b", {})
    with pytest.raises(StageError, match="has no tensor 'probe.9'"):
        run_stage(world, tmp_path / "c", use_adapter=False, layer=9)


PROBE_STEP = """\
import numpy as np
import torch
from safetensors.numpy import save_file
from harness.models.base import load_model

def probe(ctx):
    # a planted "probe": the mean unembedding difference of the answers' tokens, at the last index
    model = load_model(ctx.params["args"]["base"], device="cpu")
    weight = model.get_output_embeddings().weight.detach().numpy()
    true, false = ctx.params["args"]["true_ids"], ctx.params["args"]["false_ids"]
    last = model.config.num_hidden_layers
    direction = (weight[true] - weight[false]).mean(0)
    save_file({f"probe.{last}": direction}, str(ctx.out_dir / "directions.safetensors"))
    return {"best_layer": last}
"""


def test_a_spec_runs_steer_with_gates(world, pytester):
    import shutil

    true_ids, false_ids = [c.true_id for c in world["items"]], [c.false_id for c in world["items"]]
    shutil.copy(MCQS, pytester.path / "mcqs.jsonl")
    shutil.copytree(world["train_dir"] / "adapter", pytester.path / "planted_adapter")
    pytester.makepyfile(
        probesteps=PROBE_STEP,
        trainsteps=(
            "import shutil\n\n"
            "def train(ctx):\n"
            "    shutil.copytree(ctx.params['inputs']['adapter'], ctx.out_dir / 'adapter')\n"
            "    return {}\n"
        ),
    )
    pytester.makefile(
        ".yaml",
        exp=textwrap.dedent(
            f"""\
            seed: 3
            stages:
              probe:
                kind: python
                params:
                  function: "probesteps:probe"
                  args: {{base: "{world["base"]}", true_ids: {true_ids}, false_ids: {false_ids}}}
                  metrics: [best_layer]
              train:
                kind: python
                params: {{function: "trainsteps:train", inputs: {{adapter: planted_adapter}}}}
              steer:
                kind: steer
                needs: {{probe: probe, adapter: train}}
                params:
                  base: "{world["base"]}"
                  mcqs: mcqs.jsonl
                  scoring: continuation
                  multipliers: [-10, 10]
                  prompts: []
                gates:
                  - slope > 0
                  - effect_minus_random > 0.1
            """
        ),
    )
    result = pytester.runpytest("exp.yaml", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    report = json.loads((pytester.path / "runs/exp/default/report.json").read_text())
    [stage] = [s for s in report["stages"] if s["stage"] == "steer"]
    assert stage["metrics"]["layer"] == world["plain"].config.num_hidden_layers
    assert (Path(stage["dir"]) / "generations.jsonl").read_text() == ""
