"""Steps of experiments/planted_signal.yaml: can a linear probe find a planted direction?

A minimal, honest example of `python` stages: the data carry a real signal of known
strength, the probe is cross-validated, and a shuffled-label baseline shows the floor.
"""

from __future__ import annotations

import json

import numpy as np

from harness import StageContext


def make_data(ctx: StageContext) -> dict:
    args = ctx.params["args"]
    rng = np.random.default_rng(ctx.seed)
    n, dim, strength = args["n"], args["dim"], args["signal"]
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    labels = rng.integers(0, 2, size=n)
    x = rng.normal(size=(n, dim)) + np.outer(2 * labels - 1, direction) * strength
    np.savez(ctx.out_dir / "data.npz", x=x, y=labels, direction=direction)
    return {"n_items": int(n), "positive_rate": float(labels.mean())}


def fit_probe(ctx: StageContext) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    data = np.load(ctx.upstream["data"].dir / "data.npz")
    x, y = data["x"], data["y"]
    folds = StratifiedKFold(n_splits=ctx.params["args"]["folds"], shuffle=True, random_state=ctx.seed)
    probe = LogisticRegression(C=ctx.params["args"]["C"], max_iter=1000)
    auc = cross_val_score(probe, x, y, cv=folds, scoring="roc_auc")
    shuffled = np.random.default_rng(ctx.seed).permutation(y)
    dummy = cross_val_score(probe, x, shuffled, cv=folds, scoring="roc_auc")
    half_width = 1.96 * auc.std(ddof=1) / np.sqrt(len(auc))
    results = {"auc_per_fold": auc.tolist(), "dummy_auc_per_fold": dummy.tolist()}
    (ctx.out_dir / "probe_results.json").write_text(json.dumps(results, indent=2))
    ctx.log(f"probe AUC {auc.mean():.3f} +- {auc.std():.3f}, shuffled-label AUC {dummy.mean():.3f}")
    return {
        "auc": {
            "value": float(auc.mean()),
            "ci_low": float(auc.mean() - half_width),
            "ci_high": float(auc.mean() + half_width),
        },
        "dummy_auc": float(dummy.mean()),
        "auc_minus_dummy": float(auc.mean() - dummy.mean()),
    }
