"""Command-line usage: `--rerun` names, and what `pytest --help` says of the harness."""

from __future__ import annotations

import pytest

SPEC = """\
stages:
  probe:
    kind: python
    params: {function: "steps:step", metrics: [value]}
  em:
    kind: python
    matrix: {seed: [1, 2]}
    params: {function: "steps:step", metrics: [value]}
"""


@pytest.fixture
def experiment(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(steps="def step(ctx):\n    return {'value': 1}\n")
    pytester.makefile(".yaml", exp=SPEC)
    return pytester


def test_rerun_of_an_unknown_stage_stops_collection_with_did_you_mean(experiment):
    result = experiment.runpytest("exp.yaml", "--rerun", "prob")
    assert result.ret == pytest.ExitCode.INTERRUPTED  # as a spec's mistakes stop collection
    assert (
        "--rerun prob: no such stage (did you mean 'probe'?). The collected experiments' stages: "
        "em[1], em[2], probe (or `all`, or a matrix's name)"
    ) in result.stdout.lines
    result.assert_outcomes(errors=1)
    assert not (experiment.path / "runs").exists()


def test_rerun_accepts_a_stage_a_matrix_and_all(experiment):
    for name in ("probe", "em", "all"):
        experiment.runpytest("exp.yaml", "--rerun", name).assert_outcomes(passed=3)


def test_help_names_the_cache_directory_and_the_ini_options(pytester: pytest.Pytester):
    result = pytester.runpytest("--help")
    text = result.stdout.str()
    options = text.split("[pytest] ini-options")[0]
    assert "HARNESS_CACHE_DIR: tiny worlds, LLM response cache, default ~/.cache/harness" in options
    for ini in ("harness_runs_dir", "harness_executor", "harness_experiments", "harness_max_retries"):
        result.stdout.fnmatch_lines([f"  {ini} (*"])
    result.stdout.fnmatch_lines(["*--plan*", "*--runs-dir*"])
