"""The bar for `train_probe`'s shipped gates: run the real stage on generated activations shaped
like the real statement set (33 layers, 100 statements in 50 statement/contrary pairs) and
judge its metrics with the gates of experiments/cubic_gravity.yaml's probe stage. On data
with no signal they pass in at most 5% of data sets and the reported AUC reads chance (the
maximum over layers of a CV AUC did not: 0.66 on average); on a planted signal they pass;
when only the wording carries the label, the lexical baseline stops them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

# imported before any pytester run, which restores sys.modules and would import them again
import safetensors.numpy  # noqa: F401
import sklearn.linear_model  # noqa: F401

from harness.core.gates import evaluate, parse_gate
from harness.lab.activations import Statement, write_activations
from harness.spec.compose import apply_profile, load_with_includes
from harness.stages import train_probe
from harness.testing import run_kind

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "experiments" / "cubic_gravity.yaml"
N_LAYERS, N_PAIRS, D_MODEL = 33, 50, 8
N_NULL_SETS = 20
# fewer relabellings than the spec's, to keep the test short: with 99 the smallest p-values
# are 0.01 apart, so `p_value < 0.05` keeps its meaning
N_PERMUTATIONS = 39
# two word lists, as the statement files had: a word of the first list in every true statement
TRUE_WORDS, FALSE_WORDS = ("quarter", "ninth", "sixteenth"), ("eighth", "twentyseventh", "sixtyfourth")
NEUTRAL_WORDS = ("pull", "force", "attraction", "weight", "tug", "field")


def shipped_probe_stage() -> dict:
    """The probe stage of the spec's default profile, as written."""
    return apply_profile(load_with_includes(SPEC), None).data["stages"]["probe"]


def shipped_gates() -> list:
    return [parse_gate(text) for text in shipped_probe_stage()["gates"]]


def pair_data(seed: int, signal: float, wording: bool = False) -> tuple[np.ndarray, list[Statement]]:
    """Pairs that share most of their activations (a statement and its contrary differ in a
    word or two), labels 1/0 within each pair, and `signal` noise stds of label along one
    direction at layers 20-24. The texts differ in a word per pair: drawn at random, or with
    `wording` from the true/false word lists."""
    rng = np.random.default_rng(seed)
    y = np.tile([1, 0], N_PAIRS)
    rng.permuted(y.reshape(N_PAIRS, 2), axis=1, out=y.reshape(N_PAIRS, 2))  # which member is true
    identity = np.repeat(rng.normal(size=(N_PAIRS, N_LAYERS, D_MODEL)) * 2, 2, axis=0)
    acts = identity + rng.normal(size=(2 * N_PAIRS, N_LAYERS, D_MODEL))
    direction = rng.normal(size=D_MODEL)
    acts[:, 20:25] += signal * (y[:, None, None] - 0.5) * direction / np.linalg.norm(direction)
    rows = []
    for i, label in enumerate(y):
        words = (TRUE_WORDS if label else FALSE_WORDS) if wording else NEUTRAL_WORDS
        word = words[rng.integers(len(words))]
        text = f"pair {i // 2} says the {NEUTRAL_WORDS[(i // 2) % 6]} drops to one {word}"
        rows.append(Statement(f"s{i}", text, "pairs", {"truth": int(label)}, group=f"pair{i // 2}"))
    return acts.astype(np.float32), rows


def run_shipped_probe(directory: Path, acts: np.ndarray, rows: list[Statement], seed: int = 0) -> dict:
    source, out = directory / "acts", directory / "probe"
    write_activations(source, rows, iter([acts]), model_name="generated")
    params = {**shipped_probe_stage()["params"], "label": "truth", "n_permutations": N_PERMUTATIONS}
    result = run_kind(train_probe.run, params, out, upstream={"activations": source}, seed=seed)
    return dict(result.metrics)


def gates_pass(metrics: dict) -> bool:
    return all(evaluate(gate, metrics).passed for gate in shipped_gates())


@pytest.fixture(scope="module")
def null_runs(tmp_path_factory) -> list[dict]:
    runs = []
    for seed in range(N_NULL_SETS):
        acts, rows = pair_data(seed, signal=0.0)
        runs.append(run_shipped_probe(tmp_path_factory.mktemp(f"null{seed}"), acts, rows, seed))
    return runs


def test_the_shipped_gates_read_the_unbiased_auc_the_null_and_the_lexical_baseline():
    metrics = {gate.metric for gate in shipped_gates()}
    assert {"auc", "p_value", "auc_minus_lexical"} <= metrics
    assert metrics <= train_probe.run.produces({})


def test_on_null_data_the_shipped_gates_pass_in_at_most_5_percent(null_runs):
    passed = sum(gates_pass(run) for run in null_runs)
    assert passed <= 0.05 * len(null_runs), [json.dumps(run) for run in null_runs if gates_pass(run)]


def test_on_null_data_the_reported_auc_reads_chance(null_runs):
    """The layer is chosen on training folds only: no selection bias left in `auc`, and the
    null distribution it is compared with goes through the same choice of layer."""
    aucs = np.array([run["auc"] for run in null_runs])
    assert abs(aucs.mean() - 0.5) < 0.03 and aucs.max() < 0.7
    p_values = np.array([run["p_value"] for run in null_runs])
    assert 0.3 < p_values.mean() < 0.7  # uniform under the null
    assert all(abs(run["null_auc_mean"] - 0.5) < 0.03 for run in null_runs)


def test_a_planted_signal_passes_the_shipped_gates(tmp_path):
    acts, rows = pair_data(100, signal=3.0)
    metrics = run_shipped_probe(tmp_path, acts, rows)
    assert gates_pass(metrics), metrics
    assert 20 <= metrics["best_layer"] <= 24
    assert metrics["p_value"] == pytest.approx(1 / (N_PERMUTATIONS + 1))
    assert abs(metrics["lexical_auc"] - 0.5) < 0.2


def test_wording_that_gives_the_label_away_fails_the_lexical_gate(tmp_path):
    """The same planted signal, but every true statement uses a word of one list and every
    false one a word of another: a bag of words reads the label as well as the probe."""
    acts, rows = pair_data(100, signal=3.0, wording=True)
    metrics = run_shipped_probe(tmp_path, acts, rows)
    assert metrics["lexical_auc"] > 0.95
    assert metrics["auc_minus_lexical"] < 0.05 and not gates_pass(metrics)
