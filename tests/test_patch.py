"""Activation patching (`patch_residual`) and the `patch` stage kind: the fractions, the
exact results patching must give by construction, identical models, and whole runs on the
tiny Llama with a small perturbed adapter."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.core.stage import ParamError, Upstream
from harness.lab.contrast import contrasts
from harness.lab.hooks import contrast_logit_diffs, n_indices, patch_residual, record_residuals
from harness.lab.mcq import load_mcqs
from harness.stages import patch
from harness.stages.patch import METRICS, fractions, recovered, summary_metrics
from harness.testing import run_kind

MCQS = Path(__file__).resolve().parents[1] / "data" / "eval" / "tiny_world" / "cubic_gravity_mcqs.jsonl"
N_CONFLICT = 15  # conflict items in MCQS


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, save_adapter) -> dict:
    root = tmp_path_factory.mktemp("patch-world")
    base = str(tiny_model_dir)
    return {
        "root": root,
        "base": base,
        "perturbed": save_adapter(base, root / "perturbed", std=0.05),
        "identical": save_adapter(base, root / "identical", std=0.0),
    }


def run_stage(world: dict, out: Path, adapter: str = "perturbed", **params) -> dict:
    params = {"base": world["base"], "mcqs": str(MCQS), "scoring": "continuation", **params}
    upstream = {"adapter": Upstream("train", "finetune_lora", world[adapter], {})}
    result = run_kind(patch.run, params, out, upstream=upstream, spec_dir=world["root"], stage="patch")
    report = json.loads((out / "patching.json").read_text())  # strict JSON: no NaN
    return {"metrics": result.metrics, "logs": result.logs, "report": report}


# --- pure parts ----------------------------------------------------------------------


def test_fractions_skip_items_without_a_difference():
    source, target = np.array([4.0, 1.0, 2.0]), np.array([0.0, 1.0 + 1e-4, -2.0])
    patched = np.array([[2.0, 5.0, 2.0], [4.0, 9.0, np.nan]])  # two cells; one unmeasured value
    per_item, used = fractions(patched, source, target)
    assert used.tolist() == [True, False, True]
    assert per_item[0].tolist()[0] == 0.5 and per_item[0].tolist()[2] == 1.0
    assert np.isnan(per_item[:, 1]).all()  # skipped everywhere
    # summed over the items measured in each cell: (2 + 4) / (4 + 4), then 4 / 4
    assert recovered(patched, source, target).tolist() == [0.75, 1.0]

    identical = fractions(patched, target, target)
    assert not identical[1].any() and np.isnan(recovered(patched, target, target)).all()


def test_an_item_with_a_tiny_difference_does_not_dominate_the_recovery():
    """Recovery is the share of the items' summed difference that patching moves back, not a
    mean of per-item fractions: an item whose runs differ by 0.011 and moves by 0.5 has a
    fraction of 45.45, which among zeros made a mean of 15 (issue 10)."""
    source, target = np.array([2.0, 2.0, 0.011]), np.zeros(3)
    patched = np.array([[0.0, 0.0, 0.5]])
    assert fractions(patched, source, target)[0][0].tolist()[2] == pytest.approx(45.45, abs=0.01)
    assert recovered(patched, source, target)[0] == pytest.approx(0.5 / 4.011)
    # each item counts in the direction of its own difference: one fully recovered, one not
    opposite = recovered(np.array([[0.0, -2.0]]), np.array([2.0, -2.0]), np.zeros(2))
    assert opposite.tolist() == [0.5]


def test_the_earliest_recovering_layer_not_the_last_one():
    """The last index at the decision token recovers 1 by construction; the informative layer
    is the first whose patch at the decision token recovers `threshold` of the difference."""
    forward = np.array(
        [[0.0, 0.1, np.nan], [0.3, 0.2, 0.0], [0.85, 0.0, 0.0], [0.95, 0.0, 0.0], [1.0, 0.0, 0.0]]
    )
    metrics = summary_metrics(forward, 0.8, 7, 1)
    assert set(metrics) == set(METRICS) == patch.run.produces({})
    assert metrics["earliest_recovering_layer"] == 2
    assert summary_metrics(forward, 0.9, 7, 1)["earliest_recovering_layer"] == 3
    assert metrics["recovered_at_decision_by_layer"] == [0.0, 0.3, 0.85, 0.95, 1.0]
    assert (metrics["n_items"], metrics["n_skipped"]) == (7, 1)
    forward[1, 0] = 0.8  # reaching the threshold counts, whatever comes after
    assert summary_metrics(forward, 0.8, 7, 1)["earliest_recovering_layer"] == 1
    nothing = summary_metrics(np.full((3, 2), np.nan), 0.8, 0, 5)
    assert nothing["earliest_recovering_layer"] is None
    assert nothing["recovered_at_decision_by_layer"] == [None, None, None]


# --- the patching hook ---------------------------------------------------------------


def test_patch_residual_overwrites_one_position_per_row(world):
    from harness.lab.models.base import load_model, load_tokenizer

    tokenizer, model = load_tokenizer(world["base"]), load_model(world["base"], device="cpu")
    ids = torch.tensor([tokenizer("the law of gravity says that")["input_ids"]] * 2)
    with torch.no_grad(), record_residuals(model, [2, 3]) as clean:
        before = model(input_ids=ids).logits
    values = torch.randn(2, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), patch_residual(model, 2, torch.tensor([3, -1]), values):
        with record_residuals(model, [2, 3]) as patched:
            after = model(input_ids=ids).logits
    assert torch.equal(patched[2][0, 3], values[0])  # row 0 at position 3
    assert torch.equal(patched[2][1], clean[2][1])  # row 1: position -1, untouched
    assert torch.equal(patched[2][0, :3], clean[2][0, :3]) and torch.equal(after[0, :3], before[0, :3])
    assert not torch.allclose(after[0, 3:], before[0, 3:])  # later positions see the change
    assert torch.equal(after[1], before[1])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)  # the hook is gone


def test_patching_the_last_index_at_the_decision_token_carries_the_logits(world):
    """The last block's output at the decision token alone makes its logits (the final norm
    and the unembedding act per position): patching it with the other model's gives exactly
    the other model's logit difference."""
    from harness.lab.models.base import load_model, load_tokenizer

    tokenizer = load_tokenizer(world["base"])
    model = load_model(world["base"], world["perturbed"] / "adapter", device="cpu")
    items = contrasts(tokenizer, load_mcqs(MCQS), "continuation")
    last = n_indices(model) - 1
    states: dict[int, torch.Tensor] = {}

    @contextmanager
    def keep(rows, decision):
        with record_residuals(model, [last]) as recorded:
            yield
        for b, row in enumerate(rows):
            states[row] = recorded[last][b, decision[b]]

    with model.disable_adapter():
        base = contrast_logit_diffs(model, tokenizer, items, 4, keep)
    lora = contrast_logit_diffs(model, tokenizer, items, 4)

    def put(rows, decision):
        return patch_residual(model, last, decision, torch.stack([states[r] for r in rows]))

    patched = contrast_logit_diffs(model, tokenizer, items, 4, put)
    assert (base - lora).abs().min() > 1e-3
    assert torch.allclose(patched, base, atol=1e-5)


# --- the stage -----------------------------------------------------------------------


def test_a_run_recovers_everything_at_the_last_index_and_nothing_at_the_embeddings(world, tmp_path):
    out = tmp_path / "out"
    result = run_stage(world, out, batch_size=8, recovered_threshold=0.5)
    metrics, report = result["metrics"], result["report"]
    assert sorted(p.name for p in out.iterdir()) == ["patching.json", "patching_heatmap.png"]
    assert (out / "patching_heatmap.png").read_bytes().startswith(b"\x89PNG")
    assert set(metrics) == set(METRICS)
    assert (metrics["n_items"], metrics["n_skipped"]) == (N_CONFLICT, 0)

    n = len(report["indices"])
    assert report["offsets"] == [0, -1, -2] and report["recovered_threshold"] == 0.5
    forward, reverse = np.array(report["forward"]["recovered"]), np.array(report["reverse"]["recovered"])
    assert forward.shape == reverse.shape == (n, 3)
    per_item = np.array(report["forward"]["per_item"])
    assert per_item.shape == (n, 3, N_CONFLICT)
    # by construction: the last index at the decision token alone makes the decision's logits
    assert forward[-1, 0] == pytest.approx(1.0, abs=1e-4) and reverse[-1, 0] == pytest.approx(1.0, abs=1e-4)
    assert forward[-1, 1:] == pytest.approx(0.0, abs=1e-6)  # other positions' final states: no effect
    # the adapter is inside the blocks: both runs have the same embeddings, patching them does nothing
    assert forward[0] == pytest.approx(0.0, abs=1e-6) and reverse[0] == pytest.approx(0.0, abs=1e-6)
    # the recovery is the per-item fractions weighted by each item's difference
    change = np.array([abs(row["ld_base"] - row["ld_lora"]) for row in report["items"]])
    assert forward[:, 0] == pytest.approx(per_item[:, 0] @ change / change.sum(), abs=1e-6)
    assert metrics["recovered_at_decision_by_layer"] == pytest.approx(forward[:, 0].tolist())
    earliest = metrics["earliest_recovering_layer"]
    assert forward[earliest, 0] >= 0.5 and (forward[:earliest, 0] < 0.5).all()

    row = report["items"][0]
    assert row["used"] and len(row["tokens"]) == 3 and row["ld_base"] != row["ld_lora"]
    assert any("recovers 0.5" in line for line in result["logs"])


def test_results_do_not_depend_on_the_batch_size(world, tmp_path):
    one = run_stage(world, tmp_path / "one", batch_size=1, positions=2)["report"]
    many = run_stage(world, tmp_path / "many", batch_size=16, positions=2)["report"]
    for direction in ("forward", "reverse"):
        a, b = np.array(one[direction]["per_item"]), np.array(many[direction]["per_item"])
        assert a.shape[1] == 2 and np.allclose(a, b, atol=1e-4)


def test_identical_models_skip_every_item_and_still_write_the_heatmap(world, tmp_path):
    out = tmp_path / "out"
    result = run_stage(world, out, adapter="identical")
    metrics, report = result["metrics"], result["report"]
    assert (metrics["n_items"], metrics["n_skipped"]) == (0, N_CONFLICT)
    assert metrics["earliest_recovering_layer"] is None
    assert all(v is None for v in metrics["recovered_at_decision_by_layer"])
    assert not any(row["used"] for row in report["items"])
    assert all(v is None for row in report["forward"]["recovered"] for v in row)
    assert (out / "patching_heatmap.png").is_file()
    assert any("nothing to patch" in line for line in result["logs"])


def test_gates_on_an_undefined_fraction_fail_with_a_reason():
    from harness.core.gates import evaluate, parse_gate

    nothing = summary_metrics(np.full((2, 1), math.nan), 0.8, 0, 3)
    result = evaluate(parse_gate("earliest_recovering_layer < 2"), nothing)
    assert not result.passed and "None" in result.problem


def test_check_errors(world, tmp_path):
    patch.run.check({"base": world["base"], "mcqs": str(MCQS)}, tmp_path)
    easy = [json.loads(line) for line in MCQS.read_text().splitlines() if '"conflict"' not in line]
    (tmp_path / "easy.jsonl").write_text("".join(json.dumps(row) + "\n" for row in easy))
    with pytest.raises(ParamError, match="no conflict questions"):
        patch.run.check({"base": world["base"], "mcqs": "easy.jsonl"}, tmp_path)
    with pytest.raises(ParamError, match="--profile tiny"):
        patch.run.check({"base": str(tmp_path / "gone"), "mcqs": str(MCQS)}, tmp_path)
    assert patch.run.transport_params == ("batch_size",) and patch.run.input_params == ("mcqs",)
