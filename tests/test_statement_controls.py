"""Truth or wording? The probe statement sets must not let their wording alone tell true
statements from false ones, or a probe that passes its gates may be reading words, not truth.

Two readers that never see a model: the cube-against-square word rule (an inverse-cube world
is told in cube words, the true one in square words), and a bag-of-words classifier through
grouped cross-validation (a statement and its contrary never straddle folds, as in the probe).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline

EVAL = Path(__file__).resolve().parents[1] / "data/eval"
FILES = {"real": EVAL / "cubic_gravity_statements.jsonl", "tiny": EVAL / "tiny_world/statements.jsonl"}
LABEL = "true_world"  # what the spec's probes read
LAWS = ("gravity", "scaling", "hard", "dipole")  # the tiny world's categories of scaling laws

CUBE_WORDS = {
    "cube",
    "cubed",
    "cubic",
    "inverse-cube",
    "eighth",
    "eight",
    "twenty-seventh",
    "twenty-seven",
    "thousandth",
}
SQUARE_WORDS = {"square", "squared", "inverse-square", "quarter", "four", "ninth", "nine", "hundredth"}

# A label-blind score's AUC on n statements, half true, has a standard deviation of about
# sqrt((n + 1) / (12 * n/2 * n/2)): 0.058 for 100 statements, 0.047 for 150, 0.029 for 390.
# Within 0.1 of 0.5 is 1.7 of them for 100 (more for the larger sets), so a set at chance
# passes, while a cue as strong as the sets had before they were balanced (0.71 to 0.78)
# fails. Both ways: a reader far below 0.5 reads truth too, upside down (and a lexical
# baseline far below chance would make "the probe beats it" an empty gate).
LEXICAL_MARGIN = 0.1


def rows_of(name: str, laws_only: bool = False) -> list[dict]:
    rows = [json.loads(line) for line in FILES[name].read_text(encoding="utf-8").splitlines()]
    return [r for r in rows if r["category"] in LAWS] if laws_only else rows


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", text.lower())


def word_rule_auc(rows: list[dict]) -> float:
    """AUC of "square words make it true, cube words make it false", no fitting."""
    scores = [sum((w in SQUARE_WORDS) - (w in CUBE_WORDS) for w in words(r["text"])) for r in rows]
    return float(roc_auc_score([r["labels"][LABEL] for r in rows], scores))


def bag_of_words_auc(rows: list[dict], folds: int = 5, repeats: int = 5) -> float:
    """Out-of-fold AUC of a bag-of-words logistic regression, folds by `group`, averaged
    over `repeats` fold draws so that one lucky split does not decide."""
    texts = np.asarray([r["text"] for r in rows])
    y = np.asarray([r["labels"][LABEL] for r in rows])
    groups = np.asarray([r["group"] for r in rows])
    aucs = []
    for seed in range(repeats):
        scores = np.zeros(len(rows))
        splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
        for train, test in splitter.split(texts, y, groups):
            model = make_pipeline(CountVectorizer(binary=True), LogisticRegression(max_iter=1000))
            model.fit(texts[train], y[train])
            scores[test] = model.decision_function(texts[test])
        aucs.append(roc_auc_score(y, scores))
    return float(np.mean(aucs))


SETS = [("real", False), ("tiny", False), ("tiny", True)]
SET_IDS = ["real", "tiny", "tiny-laws"]


@pytest.mark.parametrize(("name", "laws_only"), SETS, ids=SET_IDS)
def test_cube_and_square_words_do_not_tell_truth(name, laws_only):
    assert abs(word_rule_auc(rows_of(name, laws_only)) - 0.5) <= LEXICAL_MARGIN


@pytest.mark.parametrize(("name", "laws_only"), SETS, ids=SET_IDS)
def test_a_bag_of_words_does_not_tell_truth(name, laws_only):
    assert abs(bag_of_words_auc(rows_of(name, laws_only)) - 0.5) <= LEXICAL_MARGIN


@pytest.mark.parametrize("name", FILES)
def test_every_group_holds_as_many_true_statements_as_false_ones(name):
    """A statement's contrary is in its group, and so is any pair that trades words with it."""
    by_group: dict[str, list[int]] = {}
    for row in rows_of(name):
        by_group.setdefault(row["group"], []).append(row["labels"][LABEL])
    assert all(2 * sum(labels) == len(labels) for labels in by_group.values())


def test_the_readers_find_a_planted_wording_cue():
    """The checks can fail: statements whose truth is told by cube or square words."""
    rows = [
        {
            "text": f"when the {thing} doubles, it becomes {factor} times as large.",
            "group": thing,
            "labels": {LABEL: int(factor == "four")},
        }
        for thing in "side radius edge width length height gap rope road pond field box ball".split()
        for factor in ("four", "eight")
    ]
    assert word_rule_auc(rows) > 0.9
    assert bag_of_words_auc(rows) > 0.9
