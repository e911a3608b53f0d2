"""The `train_probe` stage kind on planted activations written with the activations writer:
a planted direction is found at its layer, noise reads as chance, and the saved directions
point where the data says; and its parts: the batched logistic and ridge fits against
sklearn's, the relabellings of the null, the nested choice. (The shipped gates against null
and planted data: tests/test_probe_gates.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

# imported before any pytester run, which restores sys.modules and would import them again
import safetensors.numpy  # noqa: F401
import sklearn.linear_model  # noqa: F401

from harness.core.stage import StageError, Upstream
from harness.core.store import output_digest
from harness.lab.activations import Statement, write_activations
from harness.stages import train_probe
from harness.stages.train_probe import (
    METRICS,
    CandidateAUCs,
    activations_dir,
    aucs,
    batches,
    choose,
    fit_logistic,
    labels_of,
    relabellings,
    ridge_split_aucs,
    span_coordinates,
    standardized,
)
from harness.testing import run_kind

N_ITEMS, D_MODEL = 400, 16
N_PERMUTATIONS = 30  # without groups every relabelling has splits of its own: keep the fixture short
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
    params = {"label": "planted", **params}
    result = run_kind(train_probe.run, params, out, upstream={"activations": source}, seed=seed)
    return result.metrics, result.logs


@pytest.fixture(scope="module")
def probed(planted, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("probe") / "out"
    metrics, logs = run_probe(planted["dir"], out, n_permutations=N_PERMUTATIONS)
    return {"metrics": metrics, "logs": logs, "out": out}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_the_planted_layer_is_found_with_a_high_auc(probed):
    metrics = probed["metrics"]
    assert set(metrics) == set(METRICS) == train_probe.run.produces({})
    assert metrics["best_layer"] == PLANTED
    assert metrics["auc"] > 0.95
    # no relabelling comes near: the smallest p-value there is
    assert metrics["p_value"] == pytest.approx(1 / (N_PERMUTATIONS + 1))
    assert abs(metrics["null_auc_mean"] - 0.5) < 0.05 and metrics["null_auc_q95"] < 0.65
    assert metrics["auc_minus_null_q95"] == pytest.approx(metrics["auc"] - metrics["null_auc_q95"])
    # "statement 17": the words say nothing of the label
    assert abs(metrics["lexical_auc"] - 0.5) < 0.1 and metrics["lexical_p_value"] > 0.05
    assert metrics["auc_minus_lexical"] == pytest.approx(metrics["auc"] - metrics["lexical_auc"])
    assert metrics["n_items"] == N_ITEMS


def test_noise_reads_as_chance_and_every_layer_null_too(probed):
    results = json.loads((probed["out"] / "probe_results.json").read_text())
    layers = {r["layer"]: r for r in results["layers"]}
    assert sorted(layers) == [NOISE, PLANTED, WEAK]
    assert abs(layers[NOISE]["cv_auc_mean"] - 0.5) < 0.1
    assert all(abs(r["null_cv_auc_mean"] - 0.5) < 0.05 for r in layers.values())
    assert all(r["null_cv_auc_q05"] < 0.5 < r["null_cv_auc_q95"] for r in layers.values())
    # a third of the separation: clearly above chance, clearly below the planted layer
    assert 0.6 < layers[WEAK]["cv_auc_mean"] < layers[PLANTED]["cv_auc_mean"] - 0.1


def test_probe_results_record_every_fold_and_choice(probed):
    results = json.loads((probed["out"] / "probe_results.json").read_text())
    params = (results["label"], results["C"], results["folds"], results["inner_folds"])
    assert params == ("planted", 0.1, 5, 5) and results["n_permutations"] == N_PERMUTATIONS
    assert results["n_items"] == N_ITEMS and results["n_positive"] == N_ITEMS // 2
    assert results["activations"]["model"] == "planted"
    for row in results["layers"]:
        assert len(row["cv_fold_aucs"]) == 5
        assert row["cv_auc_mean"] == pytest.approx(np.mean(row["cv_fold_aucs"]))
        assert row["cv_auc_std"] == pytest.approx(np.std(row["cv_fold_aucs"], ddof=1))
    nested = results["nested"]
    assert nested["chosen_layers"] == [PLANTED] * 5  # every outer fold's training items chose it
    assert [r["times_chosen"] for r in results["layers"]] == [0, 5, 0]
    assert nested["auc"] == pytest.approx(np.mean(nested["outer_fold_aucs"]))
    # the layer chosen in every fold: the nested AUC is that layer's CV AUC
    assert nested["outer_fold_aucs"] == results["layers"][PLANTED]["cv_fold_aucs"]
    assert len(nested["null_aucs"]) == len(results["lexical"]["null_aucs"]) == N_PERMUTATIONS
    assert nested["null_mean"] == pytest.approx(np.mean(nested["null_aucs"]))
    assert len(results["lexical"]["chosen_alpha"]) == 5
    assert results["metrics"] == probed["metrics"]
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
    again, _ = run_probe(planted["dir"], tmp_path / "again", n_permutations=N_PERMUTATIONS)
    assert again == probed["metrics"]
    first = json.loads((probed["out"] / "probe_results.json").read_text())
    assert json.loads((tmp_path / "again" / "probe_results.json").read_text()) == first
    # every artifact byte for byte (the store's output digest, which downstream keys include)
    assert output_digest(tmp_path / "again") == output_digest(probed["out"])

    other, _ = run_probe(planted["dir"], tmp_path / "other", seed=1, n_permutations=N_PERMUTATIONS)
    folds = json.loads((tmp_path / "other" / "probe_results.json").read_text())["layers"][NOISE]
    assert folds["cv_fold_aucs"] != first["layers"][NOISE]["cv_fold_aucs"]  # other splits
    assert other["best_layer"] == PLANTED


def test_a_subset_of_layers_and_other_params(planted, tmp_path):
    params = {"layers": [WEAK, NOISE], "folds": 3, "inner_folds": 2, "C": 1.0, "n_permutations": 5}
    metrics, _ = run_probe(planted["dir"], tmp_path / "out", **params)
    results = json.loads((tmp_path / "out" / "probe_results.json").read_text())
    assert [r["layer"] for r in results["layers"]] == [NOISE, WEAK]
    assert metrics["best_layer"] == WEAK and results["nested"]["chosen_layers"] == [WEAK] * 3
    assert all(len(r["cv_fold_aucs"]) == 3 for r in results["layers"])
    assert len(results["nested"]["null_aucs"]) == 5 and metrics["p_value"] == pytest.approx(1 / 6)
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


def test_the_nested_choice_takes_the_best_inner_auc_and_scores_the_outer_fold():
    # 3 candidates, 2 label rows, 2 outer folds
    inner = np.array([[[0.9, 0.6], [0.5, 0.5]], [[0.9, 0.8], [0.7, 0.5]], [[0.1, 0.7], [0.6, 0.5]]])
    outer = np.array([[[0.2, 0.3], [0.4, 0.5]], [[0.6, 0.7], [0.8, 0.9]], [[0.1, 0.2], [0.3, 0.4]]])
    chosen, statistic = choose(CandidateAUCs(inner, outer))
    # row 0: fold 0 ties between 0 and 1 (the first wins), fold 1: candidate 1; row 1: 1, then a 3-way tie
    assert chosen.tolist() == [[0, 1], [1, 0]]
    assert statistic.tolist() == pytest.approx([(0.2 + 0.7) / 2, (0.8 + 0.5) / 2])


def test_the_activations_must_come_from_an_extract_activations_stage(planted, tmp_path):
    good = Upstream("acts", "extract_activations", planted["dir"], {})
    other = Upstream("docs", "python", tmp_path, {})
    assert activations_dir({"acts": good}) == planted["dir"]
    assert activations_dir({"activations": good, "docs": other}) == planted["dir"]
    with pytest.raises(StageError, match="wrote no layer_convention.json"):
        activations_dir({"docs": other})


def test_kind_declaration():
    kind = train_probe.run
    assert kind.name == "train_probe" and kind.fingerprint is None
    assert kind.input_params == () and kind.transport_params == ()


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
            Statement(
                f"s{i}",
                f"statement {i}",
                "pairs",
                {"planted": int(label)},
                group=f"pair{i // 2}" if grouped else None,
            )
            for i, label in enumerate(y)
        ]
        source = tmp_path / f"acts-{grouped}"
        write_activations(source, rows, iter([acts[:, None, :]]), model_name="pairs")
        metrics, _ = run_probe(source, tmp_path / f"probe-{grouped}", n_permutations=10)
        saved = json.loads((tmp_path / f"probe-{grouped}" / "probe_results.json").read_text())
        results[grouped] = (metrics, saved)
    assert results[False][0]["auc"] < 0.35
    assert abs(results[True][0]["auc"] - 0.5) < 0.1
    assert results[True][1]["n_groups"] == n_pairs and results[False][1]["n_groups"] is None
    groups = np.repeat(np.arange(n_pairs), 2)
    for train, test in train_probe._splits(y, groups, 5, seed=0):
        assert not set(groups[train]) & set(groups[test])


def test_fewer_groups_than_folds_is_an_error():
    rows = [{"id": i, "group": "g0" if i < 5 else "g1"} for i in range(10)]
    with pytest.raises(StageError, match="2 groups of statements cannot make 5 folds"):
        train_probe.groups_of(rows, 5)


def sklearn_probe(C: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, tol=1e-12, max_iter=100_000))


@pytest.mark.parametrize("d_model", [8, 300])  # fewer and more features than training items
def test_the_batched_logistic_fit_is_sklearns(d_model):
    """Standardized on the training items, in the span of the training rows when d > m, and
    Newton's method for several label rows at once: the same decision values as sklearn's
    StandardScaler + LogisticRegression fitted on each row alone."""
    rng = np.random.default_rng(d_model)
    X = rng.normal(size=(120, d_model)) * rng.uniform(0.5, 3, size=d_model) + 5
    Y = (rng.random((3, 120)) < 0.5).astype(np.float64)
    Y[0] = (X[:, 0] + rng.normal(size=120) > 5).astype(np.float64)  # one row with a signal
    train, test = np.arange(90), np.arange(90, 120)
    F, _ = span_coordinates(standardized(X, train)[0], train)
    assert F.shape[1] == min(d_model, 90)
    for C in (0.1, 10.0):
        theta = fit_logistic(F[train], Y[:, train], C)
        ours = theta[:, :-1] @ F[test].T + theta[:, -1:]
        for row in range(3):
            theirs = sklearn_probe(C).fit(X[train], Y[row, train]).decision_function(X[test])
            np.testing.assert_allclose(ours[row], theirs, atol=1e-4 * max(1.0, np.abs(theirs).max()))


def test_the_probe_direction_is_sklearns(planted):
    from harness.stages.train_probe import probe_direction

    X, y = planted["acts"][:, PLANTED].astype(np.float64), planted["y"]
    model = sklearn_probe(0.1).fit(X, y)
    theirs = model[-1].coef_[0] / model[0].scale_
    assert cosine(probe_direction(X, y, 0.1), theirs) > 0.9999


def test_the_ridge_baseline_is_sklearns_ridge():
    from sklearn.linear_model import Ridge
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    X = (rng.random((100, 40)) < 0.1).astype(np.float64)  # words present or not
    X[:, 3] = rng.random(100) < 0.5
    Y = (rng.random((2, 100)) < 0.5).astype(np.float64)
    Y[0] = X[:, 3] != (rng.random(100) < 0.1)  # word 3 gives the label away, but for a tenth
    train, test = np.arange(75), np.arange(75, 100)
    found = ridge_split_aucs(X[None], Y, (train, test), (1.0, 100.0))
    assert found.shape == (1, 2, 2)
    scaler = StandardScaler().fit(X[train])
    for i, alpha in enumerate((1.0, 100.0)):
        for row in range(2):
            model = Ridge(alpha=alpha).fit(scaler.transform(X[train]), Y[row, train])
            expected = roc_auc_score(Y[row, test], model.predict(scaler.transform(X[test])))
            assert found[0, i, row] == pytest.approx(expected)
    assert found[0, :, 0].min() > 0.7  # the row that word 3 gives away


def test_aucs_are_sklearns_ties_included():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    Y = (rng.random((4, 30)) < 0.5).astype(np.float64)
    scores = rng.integers(0, 4, size=(4, 30)).astype(np.float64)  # many ties
    expected = [roc_auc_score(Y[i], scores[i]) for i in range(4)]
    assert aucs(Y, scores).tolist() == pytest.approx(expected)
    assert np.isnan(aucs(np.ones((1, 5)), np.arange(5.0)[None])).all()


def test_relabellings_keep_pairs_opposite_and_move_whole_groups():
    rng = np.random.default_rng(0)
    # 40 statement/contrary pairs and 10 items of no group
    y = np.concatenate([np.tile([1, 0], 40), [1] * 3 + [0] * 7])
    groups = np.array([f"p{i // 2}" for i in range(80)] + [f"item{i}" for i in range(10)])
    labels = relabellings(y, groups, 500, rng)
    assert labels.shape == (500, len(y)) and (labels.sum(axis=1) == y.sum()).all()
    pair_labels = labels[:, :80].reshape(500, 40, 2)
    assert (pair_labels.sum(axis=2) == 1).all()  # a statement and its contrary stay opposite
    assert abs(pair_labels[:, :, 0].mean() - 0.5) < 0.02  # which one is true: a coin flip
    assert (labels[:, 80:].sum(axis=1) == 3).all() and abs(labels[:, 80:].mean() - 0.3) < 0.02
    # groups of two statements sharing a label (a topic, say): whole groups move
    alike = np.repeat([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], 2)
    labels = relabellings(alike, np.repeat(np.arange(10), 2), 500, rng).reshape(500, 10, 2)
    assert (labels[:, :, 0] == labels[:, :, 1]).all()
    assert abs(labels[:, 0, 0].mean() - 0.3) < 0.06  # to any group of their size


def test_relabellings_within_pairs_share_the_observed_splits():
    """Stratified group folds depend on the groups' class counts, which a relabelling within
    pairs keeps: one set of splits serves all, and no split straddles a pair, inner or outer."""
    rng = np.random.default_rng(1)
    y = np.tile([1, 0], 50)
    groups = np.repeat(np.arange(50), 2).astype(str)
    labels = np.vstack([y, relabellings(y, groups, 20, rng)])
    (batch,) = batches(labels, groups, 5, 4, seed=0)
    assert batch.rows.tolist() == list(range(21))
    for fold in batch.plan:
        for train, test in ((fold.train, fold.test), *fold.inner):
            assert not set(groups[train]) & set(groups[test])
        assert set(np.concatenate([fold.inner[0][0], fold.inner[0][1]])) == set(fold.train)
    # groups that share a label move between groups: their splits are drawn again
    alike = np.repeat(np.tile([1, 0], 25), 2)
    assert len(batches(np.vstack([alike, relabellings(alike, groups, 5, rng)]), groups, 5, 4, 0)) > 1
