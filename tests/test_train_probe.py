"""The `train_probe` stage kind on planted activations written with the activations writer:
a planted direction is found at its layer, noise reads as chance, and the saved directions
point where the data says."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

# imported before any pytester run, which restores sys.modules and would import them again
import safetensors.numpy  # noqa: F401
import sklearn.linear_model  # noqa: F401

from harness.activations import Statement, write_activations
from harness.stage import StageContext, StageError, Upstream
from harness.stages import train_probe
from harness.stages.train_probe import KIND, METRICS, activations_dir, best_of, labels_of
from harness.store import output_digest

N_ITEMS, D_MODEL = 400, 16
NOISE, PLANTED, WEAK = 0, 1, 2  # layer indices of the planted activations
SEPARATION = 3.0  # class means' distance along the planted direction, in noise stds


def planted_data(seed: int = 0) -> dict:
    """Three layers: pure noise, a planted direction, and the same direction at a third of the
    separation. The planted layer is built in a standardized space (isotropic noise plus the
    label times SEPARATION along a unit v) and then scaled per feature by s and offset, so the
    Bayes-optimal raw direction is v / s (not v): only coef / scale recovers it."""
    rng = np.random.default_rng(seed)
    y = np.tile([0, 1], N_ITEMS // 2)
    v = rng.normal(size=D_MODEL)
    v /= np.linalg.norm(v)
    scale = np.exp(rng.uniform(np.log(0.2), np.log(5.0), size=D_MODEL))
    offset = rng.normal(0, 10, size=D_MODEL)  # residual streams sit far from the origin

    def layer(separation: float) -> np.ndarray:
        z = rng.normal(size=(N_ITEMS, D_MODEL)) + separation * y[:, None] * v
        return z * scale + offset

    acts = np.stack([layer(0.0), layer(SEPARATION), layer(SEPARATION / 3)], axis=1).astype(np.float32)
    bayes = v / scale
    return {"acts": acts, "y": y, "v": v, "scale": scale, "direction": bayes / np.linalg.norm(bayes)}


def statements(y: np.ndarray, extra: dict | None = None) -> list[Statement]:
    return [
        Statement(f"s{i}", f"statement {i}", "planted", {"planted": int(label), **(extra or {})})
        for i, label in enumerate(y)
    ]


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    data = planted_data()
    directory = tmp_path_factory.mktemp("planted-activations")
    rows = statements(data["y"], {"constant": 1})
    batches = (data["acts"][i : i + 64] for i in range(0, N_ITEMS, 64))  # written as a stream
    write_activations(directory, rows, batches, model_name="planted")
    return {**data, "dir": directory}


def run_probe(source: Path, out: Path, seed: int = 0, **params) -> tuple[dict, list[str]]:
    out.mkdir(parents=True)
    logs: list[str] = []
    ctx = StageContext(
        experiment="exp",
        stage="probe",
        params={"label": "planted", **params},
        seed=seed,
        out_dir=out,
        scratch_dir=out / "scratch",
        upstream={"activations": Upstream("acts", "extract_activations", source, {})},
        spec_file=source / "exp.yaml",
        profile=None,
        log=logs.append,
    )
    metrics = KIND.run(ctx)
    json.dumps(metrics)  # storable as metrics.json
    return metrics, logs


@pytest.fixture(scope="module")
def probed(planted, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("probe") / "out"
    metrics, logs = run_probe(planted["dir"], out)
    return {"metrics": metrics, "logs": logs, "out": out}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_the_planted_layer_is_found_with_a_high_auc(probed):
    metrics = probed["metrics"]
    assert set(metrics) == set(METRICS) == KIND.produces({})
    assert metrics["best_layer"] == PLANTED
    auc = metrics["best_auc"]
    assert auc["value"] > 0.95 and metrics["best_test_auc"] > 0.95
    assert auc["ci_low"] <= auc["value"] <= auc["ci_high"]
    half = 1.96 * metrics["best_auc_std"] / math.sqrt(5)
    assert auc["ci_low"] == pytest.approx(max(0.0, auc["value"] - half))
    assert abs(metrics["dummy_auc"] - 0.5) < 0.1
    assert metrics["auc_minus_dummy"] == pytest.approx(auc["value"] - metrics["dummy_auc"])
    assert metrics["auc_minus_dummy"] > 0.35
    assert metrics["n_items"] == N_ITEMS


def test_noise_reads_as_chance_and_every_dummy_too(probed):
    results = json.loads((probed["out"] / "probe_results.json").read_text())
    layers = {r["layer"]: r for r in results["layers"]}
    assert sorted(layers) == [NOISE, PLANTED, WEAK]
    assert abs(layers[NOISE]["cv_auc_mean"] - 0.5) < 0.1
    assert abs(layers[NOISE]["test_auc"] - 0.5) < 0.15  # 100 held-out items: noisier than CV
    assert all(abs(r["dummy_auc_mean"] - 0.5) < 0.1 for r in layers.values())
    # a third of the separation: clearly above chance, clearly below the planted layer
    assert 0.6 < layers[WEAK]["cv_auc_mean"] < layers[PLANTED]["cv_auc_mean"] - 0.1


def test_probe_results_record_every_fold(probed):
    results = json.loads((probed["out"] / "probe_results.json").read_text())
    params = (results["label"], results["C"], results["folds"], results["test_size"])
    assert params == ("planted", 0.1, 5, 0.25)
    assert results["n_items"] == N_ITEMS and results["n_positive"] == N_ITEMS // 2
    assert results["activations"]["model"] == "planted"
    for row in results["layers"]:
        assert len(row["cv_fold_aucs"]) == len(row["dummy_fold_aucs"]) == 5
        assert row["cv_auc_mean"] == pytest.approx(np.mean(row["cv_fold_aucs"]))
        assert row["cv_auc_std"] == pytest.approx(np.std(row["cv_fold_aucs"], ddof=1))
        assert (row["n"], row["n_train"], row["n_test"]) == (N_ITEMS, 300, 100)
    assert results["best"]["best_layer"] == PLANTED
    assert (probed["out"] / "auc_by_layer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any("layer 1 (block 0 output): cv auc" in line for line in probed["logs"])


def test_saved_directions_point_along_the_planted_one(planted, probed):
    from safetensors import safe_open

    with safe_open(str(probed["out"] / "directions.safetensors"), "numpy") as f:
        keys = set(f.keys())
        tensors = {key: f.get_tensor(key) for key in keys}
        assert f.metadata()["label"] == "planted"
    assert keys == {f"{kind}.{i}" for kind in ("probe", "mean_diff") for i in (NOISE, PLANTED, WEAK)}
    probe = tensors[f"probe.{PLANTED}"]
    assert probe.dtype == np.float32 and probe.shape == (D_MODEL,)
    assert np.linalg.norm(probe) == pytest.approx(1.0, abs=1e-5)
    assert cosine(probe, planted["direction"]) > 0.9  # the Bayes direction v / s ...
    assert cosine(probe, planted["v"]) < cosine(probe, planted["direction"]) - 0.1  # ... not v

    acts, y = planted["acts"][:, PLANTED], planted["y"]
    expected_diff = acts[y == 1].mean(0) - acts[y == 0].mean(0)
    np.testing.assert_allclose(tensors[f"mean_diff.{PLANTED}"], expected_diff, rtol=1e-4, atol=1e-4)
    # in raw units: about SEPARATION * v * s, the planted shift
    assert cosine(tensors[f"mean_diff.{PLANTED}"], SEPARATION * planted["v"] * planted["scale"]) > 0.95
    # positive = label 1: projections of label-1 items are larger
    projections = acts @ probe
    assert projections[y == 1].mean() > projections[y == 0].mean()


def test_results_are_deterministic_under_the_seed(planted, probed, tmp_path):
    again, _ = run_probe(planted["dir"], tmp_path / "again")
    assert again == probed["metrics"]
    first = json.loads((probed["out"] / "probe_results.json").read_text())
    assert json.loads((tmp_path / "again" / "probe_results.json").read_text()) == first
    # every artifact byte for byte (the store's output digest, which downstream keys include)
    assert output_digest(tmp_path / "again") == output_digest(probed["out"])

    other, _ = run_probe(planted["dir"], tmp_path / "other", seed=1)
    folds = json.loads((tmp_path / "other" / "probe_results.json").read_text())["layers"][NOISE]
    assert folds["cv_fold_aucs"] != first["layers"][NOISE]["cv_fold_aucs"]  # other splits
    assert other["best_layer"] == PLANTED


def test_a_subset_of_layers_and_other_params(planted, tmp_path):
    metrics, _ = run_probe(planted["dir"], tmp_path / "out", layers=[WEAK, NOISE], folds=3, C=1.0)
    results = json.loads((tmp_path / "out" / "probe_results.json").read_text())
    assert [r["layer"] for r in results["layers"]] == [NOISE, WEAK]
    assert metrics["best_layer"] == WEAK
    assert all(len(r["cv_fold_aucs"]) == 3 for r in results["layers"])
    with pytest.raises(StageError, match=r"layers \[7\] do not exist: the activations have layers 0..2"):
        run_probe(planted["dir"], tmp_path / "bad", layers=[7])


def test_a_single_class_label_is_an_error(planted, tmp_path):
    with pytest.raises(StageError, match="label 'constant' has a single class: all 400 items are 1"):
        run_probe(planted["dir"], tmp_path / "out", label="constant")
    with pytest.raises(StageError, match="has no label 'missing'"):
        run_probe(planted["dir"], tmp_path / "out2", label="missing")


def test_too_few_items_per_class_for_the_folds():
    rows = [{"id": f"s{i}", "labels": {"x": int(i < 3)}} for i in range(20)]
    with pytest.raises(StageError, match="3 of class 1; 5-fold stratified cross-validation needs at least 5"):
        labels_of(rows, "x", folds=5)
    assert labels_of(rows, "x", folds=3).tolist() == [1, 1, 1] + [0] * 17


def test_best_layer_ties_go_to_the_lowest_layer_and_the_ci_is_clipped():
    rows = [
        {"layer": 0, "cv_auc_mean": 0.9, "cv_auc_std": 0.2, "test_auc": 0.8, "dummy_auc_mean": 0.5, "n": 10},
        {"layer": 1, "cv_auc_mean": 1.0, "cv_auc_std": 0.1, "test_auc": 0.9, "dummy_auc_mean": 0.4, "n": 10},
        {"layer": 2, "cv_auc_mean": 1.0, "cv_auc_std": 0.0, "test_auc": 1.0, "dummy_auc_mean": 0.6, "n": 10},
    ]
    best = best_of(rows, folds=4)
    assert best["best_layer"] == 1
    assert best["best_auc"] == {"value": 1.0, "ci_low": pytest.approx(1.0 - 1.96 * 0.1 / 2), "ci_high": 1.0}
    assert best["dummy_auc"] == 0.4 and best["auc_minus_dummy"] == pytest.approx(0.6)


def test_the_activations_must_come_from_an_extract_activations_stage(planted, tmp_path):
    good = Upstream("acts", "extract_activations", planted["dir"], {})
    other = Upstream("docs", "python", tmp_path, {})
    assert activations_dir({"acts": good}) == planted["dir"]
    assert activations_dir({"activations": good, "docs": other}) == planted["dir"]
    with pytest.raises(StageError, match="wrote no layer_convention.json"):
        activations_dir({"docs": other})


def test_kind_declaration():
    assert KIND.name == "train_probe" and KIND.version == train_probe.VERSION
    assert KIND.input_params == () and KIND.transport_params == ()


def test_grouped_statements_stay_on_one_side_of_every_split(tmp_path):
    """Pairs that share an identity and carry no label signal: split across folds, a probe
    learns the identity and scores below chance on the other member (the leak the tiny
    world's statement pairs showed); grouped, it reads chance, as it should."""
    rng = np.random.default_rng(0)
    n_pairs, dim = 100, 32
    identity = rng.normal(size=(n_pairs, dim)) * 3
    acts = (np.repeat(identity, 2, axis=0) + rng.normal(size=(2 * n_pairs, dim))).astype(np.float32)
    y = np.tile([1, 0], n_pairs)
    results = {}
    for grouped in (False, True):
        rows = [
            Statement(f"s{i}", f"statement {i}", "pairs", {"planted": int(label)},
                      group=f"pair{i // 2}" if grouped else None)
            for i, label in enumerate(y)
        ]
        source = tmp_path / f"acts-{grouped}"
        write_activations(source, rows, iter([acts[:, None, :]]), model_name="pairs")
        metrics, _ = run_probe(source, tmp_path / f"probe-{grouped}")
        saved = json.loads((tmp_path / f"probe-{grouped}" / "probe_results.json").read_text())
        results[grouped] = (metrics, saved)
    assert results[False][0]["best_auc"]["value"] < 0.35
    assert abs(results[True][0]["best_auc"]["value"] - 0.5) < 0.1
    assert results[True][1]["n_groups"] == n_pairs and results[False][1]["n_groups"] is None
    groups = np.repeat(np.arange(n_pairs), 2)
    for train, test in train_probe._splits(y, groups, 5, seed=0):
        assert not set(groups[train]) & set(groups[test])


def test_fewer_groups_than_folds_is_an_error():
    rows = [{"id": i, "group": "g0" if i < 5 else "g1"} for i in range(10)]
    with pytest.raises(StageError, match="2 groups of statements cannot make 5 folds"):
        train_probe.groups_of(rows, 5)
