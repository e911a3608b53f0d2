"""`phase_transition`: the transition step, its bootstrap interval and the B geometry."""

from __future__ import annotations

import json

import numpy as np
import pytest

from harness.core.stage import StageError
from harness.stages.phase_transition import (
    RunCurve,
    b_vector,
    bootstrap_transitions,
    checkpoints,
    geometry,
    run_samples,
    transition,
)


def test_the_transition_ends_the_largest_rise():
    assert transition([0, 5, 10, 15, 20], [0.0, 0.05, 0.1, 0.6, 0.65]) == (15, pytest.approx(0.5))


def test_a_sharp_jump_gives_a_narrow_interval_and_noise_a_wide_one():
    steps = [0, 5, 10, 15, 20]
    rng = np.random.default_rng(0)
    sharp = [rng.binomial(1, p, 200).astype(float) for p in (0.02, 0.03, 0.05, 0.7, 0.72)]
    flat = [rng.binomial(1, 0.2, 200).astype(float) for _ in steps]
    narrow = bootstrap_transitions(steps, sharp, 300, seed=1)
    wide = bootstrap_transitions(steps, flat, 300, seed=1)
    assert set(narrow) == {15}
    assert len(set(wide)) >= 3
    assert bootstrap_transitions(steps, flat, 50, seed=2) == bootstrap_transitions(steps, flat, 50, seed=2)


def test_geometry_of_a_straight_run_and_of_a_turn():
    straight = [np.array([0.0, 0.0]), np.array([1.0, 0.0]), np.array([2.0, 0.0]), np.array([3.0, 0.0])]
    rows = geometry(straight)
    assert [r["b_norm"] for r in rows] == [0.0, 1.0, 2.0, 3.0]
    assert rows[0]["cos_to_final"] is None and rows[2]["cos_to_final"] == pytest.approx(1.0)
    assert [r["local_cos"] for r in rows] == [None, pytest.approx(1.0), pytest.approx(1.0), None]
    turn = [np.array([0.0, 0.0]), np.array([1.0, 0.0]), np.array([1.0, 1.0])]
    assert geometry(turn)[1]["local_cos"] == pytest.approx(0.0)


def test_checkpoints_in_step_order_with_the_final_adapter(tmp_path, tiny_chat_dir, save_adapter):
    base = str(tiny_chat_dir)
    (tmp_path / "stage/checkpoints").mkdir(parents=True)
    for step in (10, 5):
        save_adapter(base, tmp_path / f"ck{step}", std=0.01, seed=step)
        (tmp_path / f"ck{step}/adapter").rename(tmp_path / f"stage/checkpoints/step-{step}")
    save_adapter(base, tmp_path / "stage", std=0.01, seed=1)
    (tmp_path / "stage/train_metadata.json").write_text(json.dumps({"n_steps": 12}))
    found = checkpoints(tmp_path / "stage")
    assert [step for step, _ in found] == [5, 10, 12]
    assert found[-1][1] == tmp_path / "stage/adapter"
    assert b_vector(found[0][1]).ndim == 1 and np.abs(b_vector(found[0][1])).sum() > 0
    with pytest.raises(StageError, match="train the EM stage with `checkpoint_every`"):
        checkpoints(tmp_path / "ck5")


def test_training_runs_are_the_units_of_the_transition_step():
    rng = np.random.default_rng(2)
    start = rng.binomial(1, 0.05, 40).astype(float).tolist()  # the shared model without EM adapter
    curves = []
    for name, jump_at in (("em_a", 10), ("em_b", 10), ("em_c", 15)):
        steps = [0, 5, 10, 15]
        indicators = [start] + [
            rng.binomial(1, 0.6 if s >= jump_at else 0.05, 40).astype(float).tolist() for s in steps[1:]
        ]
        rows = [
            {"step": s, "em_rate": {"value": float(np.mean(x))}, "local_cos": None}
            for s, x in zip(steps, indicators, strict=True)
        ]
        curves.append(RunCurve(name, steps, indicators, rows))
    transitions = [c.transition(200, seed=0) for c in curves]
    assert [t["transition_step"] for t in transitions] == [10, 10, 15]
    sets = run_samples(curves, transitions)
    step = sets["transition_step"]
    assert (step.values, step.units) == ((10.0, 10.0, 15.0), ("em_a", "em_b", "em_c"))
    assert step.level == "training run"
    assert sets["step_10"].unit_names == ["em_a", "em_b", "em_c"] and len(sets["step_10"].values) == 120
    # step 0 is one model, measured once: its answers are its units
    assert sets["step_0"].level == "answer" and len(sets["step_0"].unit_names) == 40
