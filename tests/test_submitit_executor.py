"""--executor submitit, on submitit's local executor (the machine has no Slurm): independent
stages run at once as separate processes, a stage starts after its upstreams with their
outputs, a failed upstream keeps its downstream from being submitted, and a second run
submits nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("submitit")

JOB_KIND = """
import os
import time

from harness.api import stage_kind


@stage_kind(name="job", schema=None, metrics=("pid", "value", "began", "ended", "cuda_visible"))
def run(ctx):
    if ctx.params.get("fail"):
        raise RuntimeError("this stage fails")
    began = time.time()
    time.sleep(ctx.params.get("sleep", 0))
    value = ctx.params["x"] + sum(int((up.dir / "value.txt").read_text()) for up in ctx.upstream.values())
    (ctx.out_dir / "value.txt").write_text(str(value))
    return {
        "pid": os.getpid(),
        "value": value,
        "began": began,
        "ended": time.time(),
        "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def pytest_harness_stage_kinds():
    return [run]
"""


def _run(pytester, spec: str, runs: Path, *args: str):
    pytester.makeconftest(JOB_KIND)
    pytester.makefile(".yaml", exp=spec)
    return pytester.runpytest_subprocess("exp.yaml", "--runs-dir", str(runs), "--executor", "submitit", *args)


def _metrics(runs: Path) -> dict[str, dict]:
    found = {}
    for latest in runs.glob("exp/default/*/LATEST"):
        key = latest.read_text().strip()
        found[latest.parent.name] = json.loads((latest.parent / key / "metrics.json").read_text())
    return found


def test_stages_run_as_jobs_at_once_and_after_their_upstreams(pytester, tmp_path):
    spec = (
        "stages:\n"
        "  a: {kind: job, params: {x: 1, sleep: 3}, resources: {gpus: 1}}\n"
        "  b: {kind: job, params: {x: 2, sleep: 3}}\n"
        "  total: {kind: job, needs: [a, b], params: {x: 0}, gates: [value == 3]}\n"
    )
    runs = tmp_path / "runs"
    result = _run(pytester, spec, runs, "-v", "--submitit-param", "timeout_min=10")
    result.assert_outcomes(passed=3)
    assert "harness executor submitit: submitted 3 stages" in result.stdout.str()
    metrics = _metrics(runs)
    a, b, total = metrics["a"], metrics["b"], metrics["total"]
    assert len({a["pid"], b["pid"], total["pid"]}) == 3  # each in a process of its own
    assert max(a["began"], b["began"]) < min(a["ended"], b["ended"])  # a and b at once
    assert total["began"] >= max(a["ended"], b["ended"]) and total["value"] == 3
    assert a["cuda_visible"] == "0" and not b["cuda_visible"]  # the GPUs it asked for
    assert list((runs / ".submitit").glob("*_log.out"))  # submitit's job logs

    again = _run(pytester, spec, runs, "-v")
    again.assert_outcomes(passed=3)
    assert "submitted 0 stages" in again.stdout.str()


def test_a_failed_upstream_keeps_its_downstream_from_being_submitted(pytester, tmp_path):
    spec = (
        "stages:\n"
        "  broken: {kind: job, params: {x: 1, fail: true}}\n"
        "  after: {kind: job, needs: [broken], params: {x: 1}}\n"
    )
    runs = tmp_path / "runs"
    result = _run(pytester, spec, runs, "-v")
    result.assert_outcomes(failed=1, skipped=1)
    result.stdout.fnmatch_lines(["*RuntimeError: this stage fails*"])
    assert len(list((runs / ".submitit").glob("*_submitted.pkl"))) == 1  # `after` never was


def test_a_malformed_parameter_is_a_usage_error(pytester):
    pytester.makefile(".yaml", exp="stages:\n  a: {kind: python, params: {function: 'os:getcwd'}}\n")
    result = pytester.runpytest_subprocess("exp.yaml", "--executor", "submitit", "--submitit-param", "gpu")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--submitit-param 'gpu': write KEY=VALUE" in result.stderr.str()
