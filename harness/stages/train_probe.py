"""`train_probe`: does the residual stream at the decision token linearly encode the label
`label` of `metadata.jsonl`? Read from the activations of an upstream `extract_activations`
stage (role `activations`, or the only upstream).

The probe is standardize + L2 logistic regression (C) on one layer; which layer is part of
the procedure, and the procedure is what is measured:

- Layer choice on training items only (nested cross-validation). The items are split into
  `folds` outer folds; in each, the layer is chosen by `inner_folds`-fold CV on the outer
  training items (highest mean AUC; ties: the lowest layer), a probe is fitted on them at that
  layer and scores the outer test items, which took no part in the choice. `auc` is the mean
  of these outer-fold AUCs. (The maximum over layers of CV AUCs, the old `best_auc`, read
  0.58 to 0.66 on average on data with no signal at all: 33 layers, 100 statements.)
- A null through the same whole procedure. The labels are relabelled `n_permutations` times
  in ways that are exchangeable when the activations carry no label: shuffled within each
  group (which member of a statement/contrary pair is the true one) and whole groups' labels
  moved among groups of the same size (an item without a group is a group of one). For each
  relabelling the splits are drawn again and the layers chosen again, giving the null
  distribution of `auc`: `null_auc_mean`, its 95th percentile `null_auc_q95`,
  `auc_minus_null_q95`, and `p_value` = (1 + #null >= auc) / (1 + n_permutations). (A group
  that holds two statement/contrary pairs is shuffled as a whole, which can put both members
  of a pair on one side: a wider null than the design's, so a conservative p-value.)
- A lexical baseline through the same splits and relabellings: which words and word pairs
  (of those in two statements or more) each statement's text contains, standardized, read by
  a ridge classifier whose penalty the inner CV chooses among LEXICAL_ALPHAS, as it chooses
  the probe's layer. `lexical_auc`, `auc_minus_lexical`, `lexical_p_value`: if the wording
  alone gives the label away, a probe that reads it says nothing about the model. (Ridge,
  not logistic: its closed form fits all relabellings at once on hundreds of word features.)

Statements sharing a `group` (a statement and its contrary) are never split, inner or outer:
the folds are StratifiedGroupKFold's (StratifiedKFold's without groups), seeded by the
spec's seed, like the relabellings. No confidence interval is given for `auc`: the outer
folds share training items, so their spread is not a standard error; the null distribution
says what chance reaches.

The logistic regressions are solved by Newton's method for all relabellings at once (the
same objective as sklearn's LogisticRegression: C * log-loss + |w|^2 / 2, intercept not
penalized); with more features than training items, in the span of the training items
(the representer theorem: the solution lies there). 33 layers x 4096 dimensions x 100 items
x 30 splits x 200 relabellings took 2.5 minutes on a shared 2-core machine; the time grows
with n_permutations and about as the cube of the number of items.

Artifacts:
    probe_results.json       params; per layer: its CV AUC on the outer folds (descriptive:
                             the maximum of these over layers is biased up) with the null's
                             mean and 95th percentile of it, and how often the nested CV
                             chose it; the nested CV's chosen layers and outer-fold AUCs; the
                             null's values; the lexical baseline's
    auc_by_layer.png         per-layer CV AUC with the null's 5-95% band, `auc`, its null's
                             95th percentile, the lexical baseline and `best_layer` marked;
                             layers named as in harness.lab.activations (0 = embeddings)
    directions.safetensors   per layer i: `probe.{i}`, the probe fitted on all items mapped
                             back to raw residual space (coef / scale), unit norm, pointing
                             to label 1; `mean_diff.{i}`, mean(label 1) - mean(label 0), raw

Metrics: `auc`, `null_auc_mean`, `null_auc_q95`, `auc_minus_null_q95`, `p_value`,
`lexical_auc`, `auc_minus_lexical`, `lexical_p_value`, `n_items`, and `best_layer`: the layer
the same choice makes on all items (highest mean AUC over the outer folds; ties: the lowest),
the one whose direction downstream stages use. It is descriptive: `auc` estimates how well a
layer chosen this way reads the label, not how well this one does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.api import stage_kind
from harness.core.stage import Role, StageContext, StageError, Upstream
from harness.core.upstream import find_upstream
from harness.lab.plots import figure as new_figure
from harness.lab.stats import monte_carlo_p

METRICS = (
    "auc",
    "null_auc_mean",
    "null_auc_q95",
    "auc_minus_null_q95",
    "p_value",
    "lexical_auc",
    "auc_minus_lexical",
    "lexical_p_value",
    "best_layer",
    "n_items",
)
ACTIVATIONS_ROLE = "activations"
LEXICAL_ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0)  # the lexical baseline's choice, as layers are the probe's


def activations_dir(upstream: Mapping[str, Upstream]) -> Path:
    """The directory of the upstream with role `activations`, or of the only upstream."""
    from harness.lab.activations import CONVENTION_FILE

    source = find_upstream(upstream, ACTIVATIONS_ROLE, "train_probe")
    if not (source.dir / CONVENTION_FILE).is_file():
        raise StageError(
            f"upstream stage {source.name!r} ({source.kind}) wrote no {CONVENTION_FILE}: "
            "train_probe reads the output of an extract_activations stage"
        )
    return source.dir


# --- labels, groups and their relabellings -----------------------------------------------


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


def groups_of(metadata: Sequence[Mapping[str, Any]], folds: int) -> np.ndarray | None:
    """Each item's group, or None when no item has one; checked to support `folds` folds."""
    if not any("group" in row for row in metadata):
        return None
    # an item without a group is a group of its own
    groups = np.asarray([str(row.get("group", f"item:{row.get('id')}")) for row in metadata])
    if len(set(groups)) < folds:
        raise StageError(f"{len(set(groups))} groups of statements cannot make {folds} folds (lower `folds`)")
    return groups


def relabellings(y: np.ndarray, groups: np.ndarray | None, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` relabellings of `y` [n, items], each as likely as `y` itself when the activations
    carry no label: labels shuffled within each group, and whole groups' labels moved among
    groups of the same size. Where every pair holds a statement and its contrary, one true and
    one false, each pair keeps one of each."""
    groups = np.arange(len(y)) if groups is None else groups
    _, group_index = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(group_index == g) for g in range(group_index.max() + 1)]
    out = np.empty((n, len(y)), dtype=y.dtype)
    for size in {len(m) for m in members}:
        same_size = np.stack([m for m in members if len(m) == size])  # [groups, size]
        for row in out:
            moved = y[same_size][rng.permutation(len(same_size))]
            row[same_size] = rng.permuted(moved, axis=1)
    return out


# --- splits --------------------------------------------------------------------------------

Split = tuple[np.ndarray, np.ndarray]  # train and test indices


def _splits(y: np.ndarray, groups: np.ndarray | None, folds: int, seed: int) -> list[Split]:
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if groups is None:
        return list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(y, y))
    return list(StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(y, y, groups))


@dataclass(frozen=True)
class OuterFold:
    train: np.ndarray
    test: np.ndarray
    inner: tuple[Split, ...]  # splits of `train`, as indices of all items


def nested_splits(
    y: np.ndarray, groups: np.ndarray | None, folds: int, inner_folds: int, seed: int
) -> tuple[OuterFold, ...]:
    """Outer folds over all items, and inner folds over each outer fold's training items."""
    try:
        outer = _splits(y, groups, folds, seed)
        return tuple(
            OuterFold(
                train,
                test,
                tuple(
                    (train[a], train[b])
                    for a, b in _splits(
                        y[train], None if groups is None else groups[train], inner_folds, seed
                    )
                ),
            )
            for train, test in outer
        )
    except ValueError as error:  # too few items or groups for the folds asked
        raise StageError(f"{folds} outer x {inner_folds} inner folds on {len(y)} items: {error}") from None


def split_labels(y: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """The labels stratified splits are drawn with: y sorted within each group, so that the
    splits depend on the groups' class counts only, which relabellings within groups keep."""
    if groups is None:
        return y
    _, group_index = np.unique(groups, return_inverse=True)
    items = np.arange(len(y))
    out = np.empty_like(y)
    out[np.lexsort((items, group_index))] = y[np.lexsort((y, group_index))]
    return out


@dataclass(frozen=True)
class Batch:
    """Label rows (rows of the observed-and-relabelled matrix) that share their splits."""

    rows: np.ndarray
    plan: tuple[OuterFold, ...]


def batches(
    labels: np.ndarray, groups: np.ndarray | None, folds: int, inner_folds: int, seed: int
) -> list[Batch]:
    """The label rows grouped by their nested splits, drawn for each row as for the observed
    labels."""
    rows_by_key: dict[bytes, list[int]] = {}
    for row, y in enumerate(labels):
        rows_by_key.setdefault(split_labels(y, groups).tobytes(), []).append(row)
    return [
        Batch(
            np.asarray(rows),
            nested_splits(split_labels(labels[rows[0]], groups), groups, folds, inner_folds, seed),
        )
        for rows in rows_by_key.values()
    ]


# --- logistic regression for many candidates and label rows at once ---------------------------

WORK_ELEMENTS = 10_000_000  # the size of the Newton steps' largest array: about 80 MB


def standardized(X: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """X [..., items, d] standardized with the training items' mean and std (a constant
    feature keeps scale 1, as in StandardScaler), and the scale."""
    mean = X[..., train, :].mean(axis=-2, keepdims=True)
    scale = X[..., train, :].std(axis=-2, keepdims=True)
    scale = np.where(scale < 10 * np.finfo(np.float64).eps * np.maximum(1.0, np.abs(mean)), 1.0, scale)
    return (X - mean) / scale, scale


def span_coordinates(Z: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Z [..., items, d] in coordinates of an orthonormal basis of its training rows' span,
    when that is smaller than the feature space (more features than training items): an L2
    logistic regression's weights lie in that span (the representer theorem), so it is fitted
    on m coordinates instead of d. Returns the coordinates [..., items, m] and M [..., m, m],
    the basis being Z_train' M (from the training items' Gram matrix: U / sqrt(eigenvalues),
    zero for directions the training items do not span); Z itself and None otherwise."""
    if Z.shape[-1] <= len(train):
        return Z, None
    gram = Z @ np.swapaxes(Z[..., train, :], -1, -2)  # [..., items, m]
    eigenvalues, U = np.linalg.eigh(gram[..., train, :])
    spanned = eigenvalues > eigenvalues[..., -1:] * 1e-10
    M = np.where(spanned[..., None, :], U / np.sqrt(np.where(spanned, eigenvalues, 1.0))[..., None, :], 0.0)
    return gram @ M, M


def fit_logistic(F: np.ndarray, Y: np.ndarray, C: float, tol: float = 1e-10) -> np.ndarray:
    """Weights [..., rows, r + 1] (the intercept last) minimizing C * sum(log-loss) + |w|^2 / 2,
    the intercept unpenalized (sklearn's LogisticRegression objective), for each candidate's
    features F [..., m, r] and each label row of Y [rows, m]: Newton steps with backtracking,
    all at once."""
    from scipy.special import expit

    A = np.concatenate([F, np.ones((*F.shape[:-1], 1))], axis=-1)
    At = np.swapaxes(A, -1, -2)
    penalty = np.ones(A.shape[-1])
    penalty[-1] = 0.0
    theta = np.zeros((*F.shape[:-2], len(Y), A.shape[-1]))

    def objective(theta: np.ndarray) -> np.ndarray:
        z = theta @ At
        return C * (np.logaddexp(0.0, z) - Y * z).sum(axis=-1) + 0.5 * (theta[..., :-1] ** 2).sum(axis=-1)

    value = objective(theta)
    for _ in range(100):
        p = expit(theta @ At)
        gradient = C * (p - Y) @ A + theta * penalty
        hessian = (At[..., None, :, :] * (C * p * (1 - p))[..., None, :]) @ A[..., None, :, :]
        step = np.linalg.solve(hessian + np.diag(penalty), gradient[..., None])[..., 0]
        decrement = (gradient * step).sum(axis=-1)  # twice the expected decrease
        converged = decrement < tol
        if converged.all():
            break
        t = np.where(converged, 0.0, 1.0)  # a converged problem stays: rounding would fail its test
        for _ in range(60):  # halve the step of the problems that do not decrease enough
            trial = theta - t[..., None] * step
            trial_value = objective(trial)
            short = (trial_value > value - 0.25 * t * decrement) & ~converged
            if not short.any():
                break
            t = np.where(short, t / 2, t)
        theta, value = trial, trial_value
    return theta


def aucs(Y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC along the last axis (ties count half); NaN where there is a single class."""
    from scipy.stats import rankdata

    Y = np.broadcast_to(Y, scores.shape)
    positives = Y.sum(axis=-1)
    negatives = Y.shape[-1] - positives
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((rankdata(scores, axis=-1) * Y).sum(axis=-1) - positives * (positives + 1) / 2) / (
            positives * negatives
        )


def logistic_split_aucs(X: np.ndarray, Y: np.ndarray, split: Split, Cs: Sequence[float]) -> np.ndarray:
    """[candidates, len(Cs), rows]: the test AUC of probes fitted on the split's training items,
    per candidate of X [candidates, items, d], C and label row of Y."""
    train, test = split
    F, _ = span_coordinates(standardized(X, train)[0], train)
    out = []
    for C in Cs:
        theta = fit_logistic(F[:, train], Y[:, train], C)
        scores = theta[..., :-1] @ np.swapaxes(F[:, test], -1, -2) + theta[..., -1:]
        out.append(aucs(Y[:, test], scores))
    return np.stack(out, axis=1)


def ridge_split_aucs(X: np.ndarray, Y: np.ndarray, split: Split, alphas: Sequence[float]) -> np.ndarray:
    """As logistic_split_aucs for a ridge classifier (least squares on the 0/1 labels, L2 penalty
    alpha, intercept unpenalized), in closed form for all label rows at once, which keeps a
    baseline on hundreds of word features cheap. Standardized on the training items, the
    features are centred there, so the intercept does not change a ranking and the weights are
    Z_train' (K + alpha I)^-1 t for the training items' Gram matrix K and centred labels t."""
    train, test = split
    Z = standardized(X, train)[0]
    Z_train = np.swapaxes(Z[:, train], -1, -2)
    eigenvalues, U = np.linalg.eigh(Z[:, train] @ Z_train)
    targets = Y[:, train] - Y[:, train].mean(axis=1, keepdims=True)
    projected = targets @ U  # [sets, rows, m]
    test_coordinates = np.swapaxes((Z[:, test] @ Z_train) @ U, -1, -2)  # [sets, m, test items]
    return np.stack(
        [
            aucs(Y[:, test], (projected / (eigenvalues[:, None, :] + alpha)) @ test_coordinates)
            for alpha in alphas
        ],
        axis=1,
    )


def probe_direction(X: np.ndarray, y: np.ndarray, C: float) -> np.ndarray:
    """The probe fitted on all items as a unit vector in raw residual space, toward label 1.

    On standardized inputs the score is w . (x - mu) / sigma + b, i.e. (w / sigma) . x + const,
    so the raw-space direction is coef / scale."""
    everything = np.arange(len(y))
    Z, scale = standardized(X, everything)
    F, M = span_coordinates(Z, everything)
    weights = fit_logistic(F, y[None].astype(np.float64), C)[0, :-1]
    direction = (weights if M is None else Z.T @ (M @ weights)) / scale[0]
    norm = float(np.linalg.norm(direction))
    return (direction / norm if norm > 0 else direction).astype(np.float32)


def mean_difference(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (X[y == 1].mean(axis=0) - X[y == 0].mean(axis=0)).astype(np.float32)


# --- the nested procedure ---------------------------------------------------------------------


@dataclass
class CandidateAUCs:
    """For each candidate (a layer, or a C of the lexical baseline), label row and outer fold:
    the mean AUC of the fold's inner folds, and the fold's test AUC."""

    inner: np.ndarray  # [candidates, rows, folds]
    outer: np.ndarray  # [candidates, rows, folds]


def candidate_aucs(
    X: np.ndarray,
    labels: np.ndarray,
    plan: Sequence[Batch],
    settings: Sequence[float],
    split_aucs: Callable[[np.ndarray, np.ndarray, Split, Sequence[float]], np.ndarray] = logistic_split_aucs,
) -> CandidateAUCs:
    """The AUCs of the candidates (X[i], setting) for every feature set X[i] of X [sets, items, d]
    and every setting (C, or the ridge's alpha; set-major), through every batch's splits; sets
    are fitted together as far as WORK_ELEMENTS allows."""
    folds = len(plan[0].plan)
    shape = (len(X), len(settings), len(labels), folds)
    inner, outer = np.empty(shape), np.empty(shape)
    rows_per_set = len(labels) * (min(X.shape[-1], len(X[0])) + 1) * len(X[0])
    chunk = max(1, WORK_ELEMENTS // rows_per_set)
    for first in range(0, len(X), chunk):
        sets = slice(first, first + chunk)
        X_chunk = X[sets].astype(np.float64)
        for batch in plan:
            Y = labels[batch.rows].astype(np.float64)
            for k, fold in enumerate(batch.plan):
                inner_aucs = [split_aucs(X_chunk, Y, split, settings) for split in fold.inner]
                inner[sets, :, batch.rows, k] = np.nanmean(inner_aucs, axis=0)
                outer[sets, :, batch.rows, k] = split_aucs(X_chunk, Y, (fold.train, fold.test), settings)
    return CandidateAUCs(inner.reshape(-1, len(labels), folds), outer.reshape(-1, len(labels), folds))


def choose(found: CandidateAUCs) -> tuple[np.ndarray, np.ndarray]:
    """The nested choice: per label row and outer fold, the candidate with the best inner CV
    AUC (ties: the first); returns the chosen candidates [rows, folds] and the procedure's AUC
    per row, the mean over outer folds of the chosen candidates' test AUCs."""
    chosen = np.argmax(np.nan_to_num(found.inner, nan=-np.inf), axis=0)  # argmax keeps the first maximum
    picked = np.take_along_axis(found.outer, chosen[None], axis=0)[0]
    return chosen, np.nanmean(picked, axis=1)


def null_summary(statistic: np.ndarray) -> dict[str, Any]:
    """Row 0 is observed, the rest relabelled: the observed value against the null's."""
    observed, null = float(statistic[0]), statistic[1:]
    return {
        "auc": observed,
        "null_mean": float(null.mean()),
        "null_q95": float(np.quantile(null, 0.95)),
        "p_value": monte_carlo_p(observed, null),
        "null_aucs": null.tolist(),
    }


def lexical_features(metadata: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Which words and word pairs each statement's text contains, of those in two statements or
    more: one in a single statement cannot carry over to another. (The vocabulary comes from
    the texts alone, which needs no label.)"""
    from sklearn.feature_extraction.text import CountVectorizer

    texts = [str(row.get("text", "")) for row in metadata]
    try:
        words = CountVectorizer(binary=True, ngram_range=(1, 2), min_df=2).fit_transform(texts)
    except ValueError:  # no word in two texts: nothing for the baseline to read
        return np.zeros((len(texts), 1))
    return words.toarray().astype(np.float64)


# --- the stage ---------------------------------------------------------------------------


def selected_layers(requested: Sequence[int] | None, n_layers: int) -> list[int]:
    if requested is None:
        return list(range(n_layers))
    outside = [i for i in requested if not 0 <= i < n_layers]
    if outside:
        raise StageError(f"layers {outside} do not exist: the activations have layers 0..{n_layers - 1}")
    return sorted(set(requested))


def plot_auc_by_layer(report: Mapping[str, Any], path: Path, title: str) -> Any:
    """Per layer CV AUC against its null band, the nested procedure's AUC, the lexical baseline,
    and the best_layer metric marked at its index. Returns the figure."""
    from harness.lab.activations import LAYER_AXIS, layer_tick

    rows = report["layers"]
    layers = [r["layer"] for r in rows]
    best = report["metrics"]["best_layer"]
    figure = new_figure(6.5, 3.8)
    axes = figure.add_subplot()
    axes.fill_between(
        layers,
        [r["null_cv_auc_q05"] for r in rows],
        [r["null_cv_auc_q95"] for r in rows],
        color="grey",
        alpha=0.25,
        label=f"null ({report['n_permutations']} relabellings): 5-95% of the CV AUC",
    )
    axes.axhline(0.5, color="black", lw=0.8, ls=":", label="chance")
    axes.errorbar(
        layers,
        [r["cv_auc_mean"] for r in rows],
        yerr=[r["cv_auc_std"] for r in rows],
        marker="o",
        capsize=3,
        label=f"CV AUC ± 1 sd over {report['folds']} outer folds (descriptive)",
    )
    axes.axvline(best, color="C1", lw=1, ls="--", label=f"best_layer {layer_tick(best)}")
    nested, lexical = report["nested"], report["lexical"]
    axes.axhline(
        nested["auc"], color="C3", lw=1.2, label=f"auc, layer chosen in training folds: {nested['auc']:.3f}"
    )
    axes.axhline(
        nested["null_q95"],
        color="C3",
        lw=1,
        ls="--",
        label=f"its null, 95th percentile: {nested['null_q95']:.3f}",
    )
    axes.axhline(lexical["auc"], color="C2", lw=1, ls="-.", label=f"lexical baseline: {lexical['auc']:.3f}")
    axes.set_xticks(layers, [layer_tick(i) for i in layers])
    axes.set_xlabel(LAYER_AXIS)
    axes.set_ylabel("ROC AUC")
    axes.set_ylim(0.0, 1.02)
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=6, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    return figure


def read_layers(source: Path, layers: Sequence[int], n_items: int) -> np.ndarray:
    """The activations of `layers` [layers, items, d_model], float32: every layer's probes are
    fitted together."""
    from harness.lab.activations import read_layer

    out = []
    for index in layers:
        X = read_layer(source, index)
        if len(X) != n_items:
            raise StageError(f"{source}: layer {index} has {len(X)} rows but metadata.jsonl {n_items} items")
        out.append(X.astype(np.float32))
    return np.stack(out)


def layer_rows(
    layers: Sequence[int], found: CandidateAUCs, chosen_layers: Sequence[int]
) -> list[dict[str, Any]]:
    """Per layer, its own CV AUC on the outer folds with the null's mean and 5-95% band of it
    (descriptive: the best of them over layers is biased up), and how often the nested CV chose it."""
    from harness.lab.activations import layer_name

    rows = []
    for index, outer in zip(layers, found.outer, strict=True):
        observed, null = outer[0], np.nanmean(outer[1:], axis=1)
        if np.isnan(observed).any():
            raise StageError(f"an outer test fold holds items of one class only (lower `folds`): {observed}")
        rows.append(
            {
                "layer": index,
                "name": layer_name(index),
                "cv_auc_mean": float(observed.mean()),
                "cv_auc_std": float(np.std(observed, ddof=1)),
                "cv_fold_aucs": observed.tolist(),
                "null_cv_auc_mean": float(null.mean()),
                "null_cv_auc_q05": float(np.quantile(null, 0.05)),
                "null_cv_auc_q95": float(np.quantile(null, 0.95)),
                "times_chosen": list(chosen_layers).count(index),
            }
        )
    return rows


@dataclass
class ProbeData:
    """The items, their labels and activations, and the splits of every label row."""

    source: Path
    metadata: list[dict[str, Any]]
    y: np.ndarray  # the observed labels
    groups: np.ndarray | None
    layers: list[int]
    X: np.ndarray  # [layers, items, d_model]
    labels: np.ndarray  # row 0: the observed labels; the others: the null's relabellings
    plan: list[Batch]


@dataclass
class Fitted:
    """The probes' and the lexical baseline's AUCs, and the directions fitted on all items."""

    probe: CandidateAUCs
    lexical: CandidateAUCs
    directions: dict[str, np.ndarray]


def load_probe_data(ctx: StageContext) -> ProbeData:
    from harness.lab.activations import layer_count, read_metadata

    params = ctx.params
    folds, n_permutations = params["folds"], params["n_permutations"]
    source = activations_dir(ctx.upstream)
    metadata = read_metadata(source)
    y = labels_of(metadata, params["label"], folds)
    groups = groups_of(metadata, folds)
    layers = selected_layers(params.get("layers"), layer_count(source))
    X = read_layers(source, layers, len(y))
    labels = np.vstack([y, relabellings(y, groups, n_permutations, np.random.default_rng(ctx.seed))])
    plan = batches(labels, groups, folds, params["inner_folds"], ctx.seed)
    ctx.log(
        f"{len(layers)} layers, {len(y)} items, {n_permutations} relabellings in {len(plan)} sets of splits"
    )
    return ProbeData(source, metadata, y, groups, layers, X, labels, plan)


def directions(data: ProbeData, C: float) -> dict[str, np.ndarray]:
    """Per layer, the probe fitted on all items and the difference of the classes' means."""
    tensors = {}
    for index, activations in zip(data.layers, data.X, strict=True):
        tensors[f"probe.{index}"] = probe_direction(activations.astype(np.float64), data.y, C)
        tensors[f"mean_diff.{index}"] = mean_difference(activations.astype(np.float64), data.y)
    return tensors


def fit(data: ProbeData, C: float) -> Fitted:
    from threadpoolctl import threadpool_limits

    # many small matrices: BLAS threads only contend for them
    with threadpool_limits(limits=1, user_api="blas"):
        found = candidate_aucs(data.X, data.labels, data.plan, (C,))
        lexical_found = candidate_aucs(
            lexical_features(data.metadata)[None], data.labels, data.plan, LEXICAL_ALPHAS, ridge_split_aucs
        )
        return Fitted(found, lexical_found, directions(data, C))


def nested_summary(found: CandidateAUCs, layers: Sequence[int]) -> dict[str, Any]:
    """The nested procedure's AUC against its null, the layers it chose and their outer-fold AUCs."""
    chosen, statistic = choose(found)
    return {
        **null_summary(statistic),
        "chosen_layers": [layers[i] for i in chosen[0]],
        "outer_fold_aucs": [float(found.outer[c, 0, k]) for k, c in enumerate(chosen[0])],
    }


def lexical_summary(found: CandidateAUCs) -> dict[str, Any]:
    """The lexical baseline's AUC against its null, and the penalties it chose."""
    chosen, statistic = choose(found)
    return {**null_summary(statistic), "chosen_alpha": [LEXICAL_ALPHAS[i] for i in chosen[0]]}


def log_layers(ctx: StageContext, rows: Sequence[Mapping[str, Any]]) -> None:
    for row in rows:
        ctx.log(
            f"layer {row['layer']} ({row['name']}): cv auc {row['cv_auc_mean']:.3f} "
            f"± {row['cv_auc_std']:.3f} (descriptive), null mean {row['null_cv_auc_mean']:.3f}, "
            f"chosen {row['times_chosen']}x"
        )


def probe_metrics(
    nested: Mapping[str, Any], lexical: Mapping[str, Any], best_layer: int, n_items: int
) -> dict[str, Any]:
    return {
        "auc": nested["auc"],
        "null_auc_mean": nested["null_mean"],
        "null_auc_q95": nested["null_q95"],
        "auc_minus_null_q95": nested["auc"] - nested["null_q95"],
        "p_value": nested["p_value"],
        "lexical_auc": lexical["auc"],
        "auc_minus_lexical": nested["auc"] - lexical["auc"],
        "lexical_p_value": lexical["p_value"],
        "best_layer": best_layer,
        "n_items": n_items,
    }


def probe_report(
    ctx: StageContext,
    data: ProbeData,
    rows: list[dict[str, Any]],
    nested: dict[str, Any],
    lexical: dict[str, Any],
    metrics: dict[str, Any],
) -> dict[str, Any]:
    """probe_results.json: the params, the data's counts, per layer rows, the nested procedure's
    and the lexical baseline's results, and the metrics."""
    from harness.lab.activations import read_convention

    params, groups = ctx.params, data.groups
    convention = read_convention(data.source)
    return {
        **{name: params[name] for name in ("label", "C", "folds", "inner_folds", "n_permutations")},
        "seed": ctx.seed,
        "n_items": len(data.y),
        "n_positive": int(data.y.sum()),
        "n_groups": None if groups is None else len(set(groups)),
        "activations": {
            k: convention.get(k) for k in ("model", "adapter", "position", "n_layers", "d_model")
        },
        "layers": rows,
        "nested": nested,
        "lexical": lexical,
        "metrics": metrics,
    }


def write_artifacts(ctx: StageContext, data: ProbeData, report: Mapping[str, Any], fitted: Fitted) -> None:
    from harness.core.store import write_json
    from harness.lab.activations import save_f32

    label = report["label"]
    write_json(ctx.out_dir / "probe_results.json", report)
    save_f32(
        ctx.out_dir / "directions.safetensors",
        fitted.directions,
        metadata={
            "label": label,
            "layers": ",".join(str(i) for i in data.layers),
            "probe": "unit vector in raw residual space (coef / scale), positive toward label 1",
            "mean_diff": "mean of label-1 activations minus mean of label-0 activations, raw",
        },
    )
    plot_auc_by_layer(
        report, ctx.out_dir / "auc_by_layer.png", f"{ctx.stage}: probe for {label!r}, {len(data.y)} items"
    )


@stage_kind(
    needs=(Role(ACTIVATIONS_ROLE, "the activations an extract_activations stage writes", only=True),),
    metrics=METRICS,
)
def run(ctx: StageContext) -> dict[str, Any]:
    data = load_probe_data(ctx)
    fitted = fit(data, ctx.params["C"])
    nested = nested_summary(fitted.probe, data.layers)
    rows = layer_rows(data.layers, fitted.probe, nested["chosen_layers"])
    log_layers(ctx, rows)
    best = max(rows, key=lambda r: r["cv_auc_mean"])  # the same choice on all items; ties: the first
    lexical = lexical_summary(fitted.lexical)
    ctx.log(f"lexical baseline: auc {lexical['auc']:.3f}, null q95 {lexical['null_q95']:.3f}")

    metrics = probe_metrics(nested, lexical, best["layer"], len(data.y))
    report = probe_report(ctx, data, rows, nested, lexical, metrics)
    write_artifacts(ctx, data, report, fitted)
    ctx.log(
        f"auc {metrics['auc']:.3f} with the layer chosen in training folds ({nested['chosen_layers']}), "
        f"null mean {metrics['null_auc_mean']:.3f}, q95 {metrics['null_auc_q95']:.3f}, "
        f"p {metrics['p_value']:.4f}; lexical {metrics['lexical_auc']:.3f}; "
        f"best layer {metrics['best_layer']}"
    )
    return metrics
