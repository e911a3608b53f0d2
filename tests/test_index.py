"""`harness index`: runs/index.md, .html and .json across experiments and profiles, from the
report.json of real pytester runs."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest

from harness.cli import main

STEPS = """
def step(ctx):
    v = ctx.params["args"]["value"]
    return {"value": v, "score": {"value": v, "ci_low": v - 0.5, "ci_high": v + 0.5}}
"""


def spec(name: str, value: float, tiny_value: float) -> str:
    train = {
        "kind": "python",
        "params": {"function": "steps:step", "metrics": ["value", "score"], "args": {"value": value}},
        "gates": ["value > 2", "ci_low(score) > 2"],
    }
    tiny = {"tiny": {"stages": {"train": {"params": {"args": {"value": tiny_value}}}}}}
    return json.dumps({"experiment": name, "seed": 1, "stages": {"train": train}, "profiles": tiny})


class Cells(HTMLParser):
    """The text of every table cell of a page, with its class."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[tuple[str, str]] = []
        self._open: str | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "td":
            self._open = dict(attrs).get("class") or ""
            self.cells.append((self._open, ""))

    def handle_endtag(self, tag):
        if tag == "td":
            self._open = None

    def handle_data(self, data):
        if self._open is not None:
            cls, text = self.cells[-1]
            self.cells[-1] = (cls, text + data)


@pytest.fixture
def runs(pytester: pytest.Pytester):
    pytester.makepyfile(steps=STEPS)
    pytester.makefile(".yaml", alpha=spec("alpha", 3, 1), beta=spec("beta", 4, 5))
    pytester.runpytest("alpha.yaml", "beta.yaml").assert_outcomes(passed=2)
    pytester.runpytest("alpha.yaml", "beta.yaml", "--profile", "tiny").assert_outcomes(passed=1, failed=1)
    return pytester.path / "runs"


def test_index_tables_every_experiments_gates_and_headline_metrics_per_profile(runs, capsys):
    (runs / "beta" / "stale").mkdir()  # a profile dir without report.json is not a run to show
    assert main(["index", "--runs-dir", str(runs)]) == 0
    assert capsys.readouterr().out.split() == [str(runs / f"index.{ext}") for ext in ("json", "md", "html")]

    index = json.loads((runs / "index.json").read_text())
    alpha, beta = index["experiments"]
    assert (alpha["experiment"], list(alpha["profiles"])) == ("alpha", ["default", "tiny"])
    assert [(p, r["gates_passed"], r["gates"]) for p, r in alpha["profiles"].items()] == [
        ("default", 2, 2),
        ("tiny", 0, 2),
    ]
    ci_gate = alpha["gates"][1]
    assert (ci_gate["stage"], ci_gate["gate"]) == ("train", "ci_low(score) > 2")
    assert ci_gate["profiles"]["tiny"]["headline"] == {"value": 1, "ci_low": 0.5, "ci_high": 1.5}
    assert list(beta["profiles"]) == ["default", "tiny"]

    md = (runs / "index.md").read_text()
    assert "| alpha | default | 2/2 | 1 passed |" in md
    assert "| alpha | tiny | 0/2 | 1 failed |" in md
    assert "[default](alpha/default/report.md) · [tiny](alpha/tiny/report.md)" in md
    assert "| train | value > 2 | passed: 3 | FAILED: 1 |" in md
    assert "| train | ci_low(score) > 2 | passed: 3 [2.5, 3.5] | FAILED: 1 [0.5, 1.5] |" in md
    assert "| train | ci_low(score) > 2 | passed: 4 [3.5, 4.5] | passed: 5 [4.5, 5.5] |" in md
    assert (runs / "alpha/default/report.md").is_file()  # the links resolve from runs/

    page = Cells()
    page.feed((runs / "index.html").read_text())
    assert ("bad", "FAILED: 1 [0.5, 1.5]") in page.cells
    assert ("passed", "passed: 5 [4.5, 5.5]") in page.cells


def test_index_of_a_missing_runs_directory_says_so(tmp_path, capsys):
    assert main(["index", "--runs-dir", str(tmp_path / "nowhere")]) == 2
    assert "no such runs directory" in capsys.readouterr().err


def test_gates_a_partial_run_kept_from_an_earlier_run_say_when_they_ran(pytester, capsys):
    pytester.makepyfile(steps=STEPS)
    doc = json.loads(spec("alpha", 3, 1))
    doc["stages"]["check"] = {**doc["stages"]["train"], "gates": ["value > 1"]}
    pytester.makefile(".yaml", alpha=json.dumps(doc))
    pytester.runpytest("alpha.yaml").assert_outcomes(passed=2)
    first = json.loads((pytester.path / "runs/alpha/default/report.json").read_text())["generated_at"]
    pytester.runpytest("alpha.yaml", "-k", "train").assert_outcomes(passed=1)

    assert main(["index", "--runs-dir", str(pytester.path / "runs")]) == 0
    md = (pytester.path / "runs/index.md").read_text()
    assert "| train | value > 2 | passed: 3 |" in md
    assert f"| check | value > 1 | passed: 3 (earlier run, {first}) |" in md
