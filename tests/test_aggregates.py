"""Replicate groups from stored key materials, their names and their numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.report.aggregates import aggregates, group_label, replicate_groups


def stored(
    tmp_path: Path,
    name: str,
    key: str,
    seed: int,
    metrics: dict,
    upstream: dict | None = None,
    lr: float = 0.1,
) -> dict:
    """A report row whose directory holds a manifest with this recipe."""
    directory = tmp_path / name / key
    directory.mkdir(parents=True)
    material = {
        "kind": "python",
        "code_version": "v1",
        "params": {"lr": lr},
        "seed": seed,
        "inputs": {},
        "upstream": {
            role: {"stage": stage, "key": f"{stage}-key", "digest": "d"}
            for role, stage in (upstream or {}).items()
        },
    }
    (directory / "manifest.json").write_text(
        json.dumps({"complete": True, "key": key, "key_material": material})
    )
    return {"stage": name, "key": key, "dir": str(directory), "metrics": metrics}


def test_stages_with_one_recipe_and_one_seed_are_not_replicates(tmp_path):
    rows = [stored(tmp_path, "a", "k", 1, {"x": 1}), stored(tmp_path, "b", "k", 1, {"x": 2})]
    assert replicate_groups(rows) == []


def test_stages_downstream_of_replicates_are_replicates_and_other_params_are_not(tmp_path):
    rows = [
        stored(tmp_path, "up1", "u1", 1, {}),
        stored(tmp_path, "up2", "u2", 2, {}),
        stored(tmp_path, "other", "o", 3, {}, lr=0.2),
        stored(tmp_path, "s1", "s1", 1, {"x": 1.0}, {"model": "up1"}),
        stored(tmp_path, "s2", "s2", 1, {"x": 3.0}, {"model": "up2"}),
        stored(tmp_path, "s3", "s3", 1, {"x": 9.0}, {"model": "other"}),
    ]
    assert replicate_groups(rows) == [["up1", "up2"], ["s1", "s2"]]
    (row,) = aggregates(rows)
    assert row["group"] == "s1, s2" and row["values"] == {"s1": 1.0, "s2": 3.0}
    assert row["mean"] == 2.0 and row["sd"] == pytest.approx(2**0.5)


def test_only_numbers_every_replicate_reports_are_aggregated(tmp_path):
    rows = [
        stored(
            tmp_path, "a", "k1", 1, {"auc": {"value": 0.6, "ci_low": 0.5}, "n": 3, "flag": True, "gap": 1}
        ),
        stored(tmp_path, "b", "k2", 2, {"auc": {"value": 0.8, "ci_low": 0.7}, "n": 5, "flag": False}),
    ]
    assert [(a["metric"], a["mean"]) for a in aggregates(rows)] == [("auc", pytest.approx(0.7)), ("n", 4.0)]


@pytest.mark.parametrize(
    ("names", "label"),
    [
        (["em[none,2026]", "em[none,2027]"], "em[none,*]"),
        (["em[2026]", "em[2027]"], "em[*]"),
        (["em", "em_s2"], "em, em_s2"),
        (["em[a,1]", "other[a,2]"], "em[a,1], other[a,2]"),
    ],
)
def test_groups_are_named_by_their_matrix_with_a_star_for_what_varies(names, label):
    assert group_label(names) == label
