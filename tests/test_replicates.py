"""`replicates`: gates on the aggregate of a matrix's seeds."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
from scipy import stats

from harness.stages.replicates import aggregate

STEPS = """
def measure(ctx):
    return {"x": {"value": ctx.seed / 1000, "ci_low": 0.0, "ci_high": 9.0}, "other": 1}
"""


def _spec(gates: str, metrics: str = "[x]") -> str:
    return textwrap.dedent(
        f"""\
        stages:
          m:
            kind: python
            matrix: {{seed: [1000, 2000, 4000]}}
            seed: ${{seed}}
            params: {{function: "steps:measure", metrics: [x, other]}}
          pooled:
            kind: replicates
            needs: ["m[*]"]
            params: {{metrics: {metrics}}}
            gates: {gates}
        """
    )


def test_gates_read_the_mean_its_t_interval_and_the_spread(pytester):
    pytester.makepyfile(steps=STEPS)
    pytester.makefile(".yaml", exp=_spec('["x > 2", "ci_low(x) > -5", "x.sd < 1.6", "x.n == 3"]'))
    result = pytester.runpytest("exp.yaml", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    report = json.loads((pytester.path / "runs/exp/default/report.json").read_text())
    metrics = next(s for s in report["stages"] if s["stage"] == "pooled")["metrics"]
    values = [1.0, 2.0, 4.0]
    mean, sd = sum(values) / 3, math.sqrt(sum((v - 7 / 3) ** 2 for v in values) / 2)
    half = stats.t.ppf(0.975, 2) * sd / math.sqrt(3)
    assert metrics["x"]["value"] == pytest.approx(mean)
    assert metrics["x"]["ci_low"] == pytest.approx(mean - half)
    assert metrics["x.sd"] == pytest.approx(sd) and metrics["x.min"] == 1.0 and metrics["x.max"] == 4.0


def test_a_gate_on_the_spread_fails_when_the_seeds_disagree(pytester):
    pytester.makepyfile(steps=STEPS)
    pytester.makefile(".yaml", exp=_spec('["x.sd < 0.5"]'))
    result = pytester.runpytest("exp.yaml", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*gate `x.sd < 0.5` failed: measured x.sd = 1.52753*"])


def test_a_metric_an_upstream_lacks_fails_the_stage_naming_them(pytester):
    pytester.makepyfile(steps=STEPS.replace('"other": 1', '"other": "text"'))
    pytester.makefile(".yaml", exp=_spec("[]", metrics="[other]"))
    result = pytester.runpytest("exp.yaml", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, failed=1)
    assert "metric 'other' is not a number in m[1000], m[2000], m[4000]" in result.stdout.str()


def test_one_replicate_has_no_interval():
    one = aggregate([0.5], 0.95)
    assert one["value"] == 0.5 and one["ci_low"] is None and one["sd"] is None and one["n"] == 1
