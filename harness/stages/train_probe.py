"""`train_probe`: a linear probe per layer on the activations of an upstream
`extract_activations` stage (role `activations`, or the only upstream): does the residual
stream at the decision token linearly encode the label `label` of `metadata.jsonl`?

Per probed layer, the pipeline is standardize + LogisticRegression(C), evaluated three ways:
- stratified `folds`-fold cross-validation on all items: AUC per fold, mean and std;
- one stratified train/test split (`test_size` held out): the held-out test AUC;
- a dummy: the same cross-validation on the labels permuted once (seeded by the spec's seed,
  the same permutation at every layer), which is what the pipeline reaches on no signal.
Splits and the permutation are seeded by the spec's seed. When the statements have a `group`
(e.g. a statement and its contrary), a group is never split: the folds are
StratifiedGroupKFold's, and the test split is the first of round(1 / test_size) such folds.
Without it, a probe can score by recognizing the pair rather than reading the label.

Artifacts:
    probe_results.json       per layer: cv mean/std/fold AUCs, test AUC, dummy mean/std, n
    auc_by_layer.png         CV AUC (± std) and test AUC by layer, the dummy band, chance
    directions.safetensors   per layer i: `probe.{i}`, the probe fitted on all items mapped
                             back to raw residual space (coef / scale), unit norm, pointing
                             to label 1; `mean_diff.{i}`, mean(label 1) - mean(label 0), raw

Metrics: `best_layer` (highest CV AUC mean; ties: the lowest layer), `best_auc` with the
interval mean ± 1.96 std / sqrt(folds) (std over folds, ddof 1, clipped to [0, 1]; the folds
share training items, so it is an indication, not an exact CI), `best_auc_std`,
`best_test_auc`, `dummy_auc` (dummy CV mean at the best layer), `auc_minus_dummy`, `n_items`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from harness.plots import figure as new_figure
from harness.spec.validate import SPECS_DIR, with_defaults
from harness.stage import StageContext, StageError, StageKind, Upstream
from harness.upstream import find_upstream

VERSION = "2"
METRICS = (
    "best_layer",
    "best_auc",
    "best_auc_std",
    "best_test_auc",
    "dummy_auc",
    "auc_minus_dummy",
    "n_items",
)
ACTIVATIONS_ROLE = "activations"
Z_95 = 1.96


def activations_dir(upstream: Mapping[str, Upstream]) -> Path:
    """The directory of the upstream with role `activations`, or of the only upstream."""
    from harness.activations import CONVENTION_FILE

    source = find_upstream(upstream, ACTIVATIONS_ROLE, "train_probe")
    if not (source.dir / CONVENTION_FILE).is_file():
        raise StageError(
            f"upstream stage {source.name!r} ({source.kind}) wrote no {CONVENTION_FILE}: "
            "train_probe reads the output of an extract_activations stage"
        )
    return source.dir


# --- labels --------------------------------------------------------------------------


def labels_of(metadata: Sequence[Mapping[str, Any]], label: str, folds: int) -> np.ndarray:
    """The 0/1 labels `label` of every item, checked to support `folds`-fold stratified CV."""
    values = []
    for row in metadata:
        labels = row.get("labels", {})
        if label not in labels:
            known = ", ".join(sorted(labels)) or "none"
            raise StageError(f"item {row.get('id')!r} has no label {label!r} (its labels: {known})")
        values.append(int(labels[label]))
    y = np.asarray(values, dtype=np.int64)
    counts = {c: int((y == c).sum()) for c in (0, 1)}
    if min(counts.values()) == 0:
        present = 1 if counts[1] else 0
        raise StageError(
            f"label {label!r} has a single class: all {len(y)} items are {present}; "
            "a probe needs items of both classes"
        )
    if min(counts.values()) < folds:
        raise StageError(
            f"label {label!r} has {counts[0]} items of class 0 and {counts[1]} of class 1; "
            f"{folds}-fold stratified cross-validation needs at least {folds} of each (lower `folds`)"
        )
    return y


# --- one layer -----------------------------------------------------------------------


def _pipeline(C: float) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))


def groups_of(metadata: Sequence[Mapping[str, Any]], folds: int) -> np.ndarray | None:
    """Each item's group, or None when no item has one; checked to support `folds` folds."""
    if not any("group" in row for row in metadata):
        return None
    # an item without a group is a group of its own
    groups = np.asarray([str(row.get("group", f"item:{row.get('id')}")) for row in metadata])
    if len(set(groups)) < folds:
        raise StageError(f"{len(set(groups))} groups of statements cannot make {folds} folds (lower `folds`)")
    return groups


Split = tuple[np.ndarray, np.ndarray]  # train and test indices


def _splits(y: np.ndarray, groups: np.ndarray | None, folds: int, seed: int) -> list[Split]:
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if groups is None:
        return list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(y, y))
    return list(StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(y, y, groups))


def _cv_aucs(
    X: np.ndarray, y: np.ndarray, groups: np.ndarray | None, C: float, folds: int, seed: int
) -> list[float]:
    from sklearn.metrics import roc_auc_score

    aucs = []
    for train, test in _splits(y, groups, folds, seed):
        model = _pipeline(C).fit(X[train], y[train])
        aucs.append(float(roc_auc_score(y[test], model.decision_function(X[test]))))
    return aucs


def _test_auc(
    X: np.ndarray, y: np.ndarray, groups: np.ndarray | None, C: float, test_size: float, seed: int
) -> tuple[float, int, int]:
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split

    try:
        if groups is None:
            items = np.arange(len(y))
            train, test = train_test_split(items, test_size=test_size, stratify=y, random_state=seed)
        else:
            train, test = _splits(y, groups, max(2, round(1 / test_size)), seed)[0]
    except ValueError as error:  # too few items of a class for the split asked
        raise StageError(f"test_size {test_size} on {len(y)} items: {error}") from None
    model = _pipeline(C).fit(X[train], y[train])
    return float(roc_auc_score(y[test], model.decision_function(X[test]))), len(train), len(test)


def probe_direction(X: np.ndarray, y: np.ndarray, C: float) -> np.ndarray:
    """The probe fitted on all items as a unit vector in raw residual space, toward label 1.

    On standardized inputs the score is w . (x - mu) / sigma + b, i.e. (w / sigma) . x + const,
    so the raw-space direction is coef / scale."""
    model = _pipeline(C).fit(X, y)
    scaler, logistic = model[0], model[-1]
    if list(logistic.classes_) != [0, 1]:
        raise RuntimeError(f"expected classes [0, 1], got {logistic.classes_}")
    direction = logistic.coef_[0] / scaler.scale_  # coef_ scores class classes_[1] = 1
    norm = float(np.linalg.norm(direction))
    return (direction / norm if norm > 0 else direction).astype(np.float32)


def mean_difference(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (X[y == 1].mean(axis=0) - X[y == 0].mean(axis=0)).astype(np.float32)


def _std(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def probe_layer(
    X: np.ndarray,
    y: np.ndarray,
    y_dummy: np.ndarray,
    C: float,
    folds: int,
    test_size: float,
    seed: int,
    groups: np.ndarray | None = None,
) -> dict[str, Any]:
    """One layer's evaluation (see the module docstring); X is [n_items, d_model]."""
    cv = _cv_aucs(X, y, groups, C, folds, seed)
    dummy = _cv_aucs(X, y_dummy, groups, C, folds, seed)
    test_auc, n_train, n_test = _test_auc(X, y, groups, C, test_size, seed)
    return {
        "cv_auc_mean": float(np.mean(cv)),
        "cv_auc_std": _std(cv),
        "cv_fold_aucs": cv,
        "test_auc": test_auc,
        "dummy_auc_mean": float(np.mean(dummy)),
        "dummy_auc_std": _std(dummy),
        "dummy_fold_aucs": dummy,
        "n": len(y),
        "n_train": n_train,
        "n_test": n_test,
    }


# --- all layers ----------------------------------------------------------------------


def selected_layers(requested: Sequence[int] | None, n_layers: int) -> list[int]:
    if requested is None:
        return list(range(n_layers))
    outside = [i for i in requested if not 0 <= i < n_layers]
    if outside:
        raise StageError(f"layers {outside} do not exist: the activations have layers 0..{n_layers - 1}")
    return sorted(set(requested))


def best_of(results: Sequence[Mapping[str, Any]], folds: int) -> dict[str, Any]:
    """Metrics of the layer with the highest CV AUC mean (the first such layer on ties)."""
    best = max(results, key=lambda r: r["cv_auc_mean"])  # max keeps the first maximum
    mean, std = best["cv_auc_mean"], best["cv_auc_std"]
    half = Z_95 * std / math.sqrt(folds)
    return {
        "best_layer": best["layer"],
        "best_auc": {"value": mean, "ci_low": max(0.0, mean - half), "ci_high": min(1.0, mean + half)},
        "best_auc_std": std,
        "best_test_auc": best["test_auc"],
        "dummy_auc": best["dummy_auc_mean"],
        "auc_minus_dummy": mean - best["dummy_auc_mean"],
        "n_items": best["n"],
    }


def _plot(results: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:

    from harness.activations import layer_name

    layers = [r["layer"] for r in results]
    figure = new_figure(6.5, 3.8)
    axes = figure.add_subplot()
    dummy = np.array([r["dummy_auc_mean"] for r in results])
    dummy_std = np.array([r["dummy_auc_std"] for r in results])
    axes.fill_between(
        layers, dummy - dummy_std, dummy + dummy_std, color="grey", alpha=0.25, label="dummy ± std"
    )
    axes.plot(layers, dummy, color="grey", lw=1)
    axes.axhline(0.5, color="black", lw=0.8, ls=":", label="chance")
    axes.errorbar(
        layers,
        [r["cv_auc_mean"] for r in results],
        yerr=[r["cv_auc_std"] for r in results],
        marker="o",
        capsize=3,
        label="CV AUC ± std",
    )
    axes.plot(layers, [r["test_auc"] for r in results], "x", color="C3", label="held-out test AUC")
    axes.set_xticks(layers, ["emb" if i == 0 else layer_name(i).split()[1] for i in layers])
    axes.set_xlabel("layer (emb = embeddings, k = output of block k)")
    axes.set_ylabel("ROC AUC")
    axes.set_ylim(0.0, 1.02)
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)


def run(ctx: StageContext) -> dict[str, Any]:
    from harness.activations import (
        layer_count,
        layer_name,
        read_convention,
        read_layer,
        read_metadata,
        save_f32,
    )
    from harness.store import write_json

    params = with_defaults(ctx.params, KIND.params_schema)
    label, C, folds, test_size = params["label"], params["C"], params["folds"], params["test_size"]
    source = activations_dir(ctx.upstream)
    metadata = read_metadata(source)
    y = labels_of(metadata, label, folds)
    groups = groups_of(metadata, folds)
    y_dummy = np.random.default_rng(ctx.seed).permutation(y)
    layers = selected_layers(params.get("layers"), layer_count(source))

    results: list[dict[str, Any]] = []
    tensors: dict[str, np.ndarray] = {}
    for index in layers:
        X = read_layer(source, index).astype(np.float64)  # one layer in memory at a time
        if len(X) != len(y):
            raise StageError(f"{source}: layer {index} has {len(X)} rows but metadata.jsonl {len(y)} items")
        result = {"layer": index, "name": layer_name(index)}
        result.update(probe_layer(X, y, y_dummy, C, folds, test_size, ctx.seed, groups))
        results.append(result)
        tensors[f"probe.{index}"] = probe_direction(X, y, C)
        tensors[f"mean_diff.{index}"] = mean_difference(X, y)
        ctx.log(
            f"layer {index} ({result['name']}): cv auc {result['cv_auc_mean']:.3f} "
            f"± {result['cv_auc_std']:.3f}, test {result['test_auc']:.3f}, "
            f"dummy {result['dummy_auc_mean']:.3f}"
        )

    metrics = best_of(results, folds)
    convention = read_convention(source)
    write_json(
        ctx.out_dir / "probe_results.json",
        {
            "label": label,
            "C": C,
            "folds": folds,
            "test_size": test_size,
            "seed": ctx.seed,
            "n_items": len(y),
            "n_positive": int(y.sum()),
            "n_groups": None if groups is None else len(set(groups)),
            "activations": {
                k: convention.get(k) for k in ("model", "adapter", "position", "n_layers", "d_model")
            },
            "layers": results,
            "best": metrics,
        },
    )
    save_f32(
        ctx.out_dir / "directions.safetensors",
        tensors,
        metadata={
            "label": label,
            "layers": ",".join(str(i) for i in layers),
            "probe": "unit vector in raw residual space (coef / scale), positive toward label 1",
            "mean_diff": "mean of label-1 activations minus mean of label-0 activations, raw",
        },
    )
    _plot(results, ctx.out_dir / "auc_by_layer.png", f"{ctx.stage}: probe for {label!r}, {len(y)} items")
    auc = metrics["best_auc"]
    ctx.log(
        f"best layer {metrics['best_layer']}: auc {auc['value']:.3f} "
        f"[{auc['ci_low']:.3f}, {auc['ci_high']:.3f}], dummy {metrics['dummy_auc']:.3f}"
    )
    return metrics


KIND = StageKind(
    name="train_probe",
    run=run,
    params_schema=SPECS_DIR / "stages" / "train_probe.schema.json",
    metrics=METRICS,
    version=VERSION,
)
