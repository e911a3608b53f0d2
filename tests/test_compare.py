"""`harness compare`: two profiles, two run directories, two keys of a stage, two commits; on
real stores made by pytester runs."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from harness.cli import main

STEPS = """
def step(ctx):
    v = ctx.params["args"]["value"]
    return {"value": v, "score": {"value": v, "ci_low": v - 0.5, "ci_high": v + 0.5}}
"""


def spec(value: float, tiny_value: float | None = None, stages: tuple[str, ...] = ("train",)) -> str:
    body = {
        name: {
            "kind": "python",
            "params": {"function": "steps:step", "metrics": ["value", "score"], "args": {"value": value}},
            "gates": ["value > 2", "ci_low(score) > 2"],
        }
        for name in stages
    }
    doc = {"experiment": "exp", "seed": 1, "stages": body}
    if tiny_value is not None:
        doc["profiles"] = {"tiny": {"stages": {"train": {"params": {"args": {"value": tiny_value}}}}}}
    return json.dumps(doc)  # JSON is YAML


@pytest.fixture
def world(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(steps=STEPS)
    return pytester


def compare(capsys, *args: str) -> dict:
    capsys.readouterr()  # what the pytester runs printed
    assert main(["compare", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def only_stage(comparison: dict) -> dict:
    (stage,) = comparison["stages"]
    return stage


def test_two_profiles_show_params_metric_deltas_cis_and_changed_gates(world, capsys):
    world.makefile(".yaml", exp=spec(3, tiny_value=1))
    world.runpytest("exp.yaml").assert_outcomes(passed=1)
    world.runpytest("exp.yaml", "--profile", "tiny").assert_outcomes(failed=1)

    capsys.readouterr()
    assert main(["compare", "exp.yaml", "--profiles", "default", "tiny"]) == 0
    text = capsys.readouterr().out
    assert "A = default, B = tiny" in text
    assert "| train | args.value | `3` | `1` |" in text
    assert "| train | score | 3 [2.5, 3.5] | 1 [0.5, 1.5] | -2 |" in text
    assert "## Gates that changed outcome (2 of 2)" in text
    assert "| train | `value > 2` | passed (measured 3) | FAILED (measured 1) |" in text
    assert "| train | `ci_low(score) > 2` | passed (measured 2.5) | FAILED (measured 0.5) |" in text

    stage = only_stage(compare(capsys, "exp.yaml", "--profiles", "default", "tiny"))
    assert stage["differs"] == "params changed: args.value"
    assert stage["params"] == [{"param": "args.value", "a": 3, "b": 1}]
    assert {m["metric"]: m["delta"] for m in stage["metrics"]} == {"value": -2, "score": -2}
    assert [(g["gate"], g["a"]["outcome"], g["b"]["outcome"], g["changed"]) for g in stage["gates"]] == [
        ("value > 2", "passed", "FAILED", True),
        ("ci_low(score) > 2", "passed", "FAILED", True),
    ]


def test_two_run_directories_use_their_reports_gates_and_show_stages_of_one_side(world, capsys):
    world.makefile(".yaml", exp=spec(3))
    world.runpytest("exp.yaml").assert_outcomes(passed=1)
    world.makefile(".yaml", exp=spec(3, stages=("train", "extra")).replace('"exp"', '"other"'))
    world.runpytest("exp.yaml").assert_outcomes(passed=2)

    comparison = compare(capsys, "runs/exp/default", "runs/other/default")
    assert (comparison["a"], comparison["b"]) == ("runs/exp/default", "runs/other/default")
    train, extra = comparison["stages"]
    assert train["differs"] == "same key" and train["params"] == []  # same kind, params and seed
    assert [g["changed"] for g in train["gates"]] == [False, False]
    assert extra["stage"] == "extra" and extra["a"] is None and extra["differs"] == "only in B"
    assert [(g["gate"], g["a"], g["b"]["outcome"]) for g in extra["gates"]] == [
        ("value > 2", None, "passed"),
        ("ci_low(score) > 2", None, "passed"),
    ]


def test_two_keys_of_one_stage_from_the_store_history(world, capsys):
    world.makefile(".yaml", exp=spec(3))
    world.runpytest("exp.yaml").assert_outcomes(passed=1)
    world.makefile(".yaml", exp=spec(2.2))
    world.runpytest("exp.yaml").assert_outcomes(failed=1)
    first, second = (json.loads(p.read_text())["key"] for p in _manifests(world))

    latest_two = only_stage(compare(capsys, "runs/exp/default/train"))
    assert (latest_two["a"]["key"], latest_two["b"]["key"]) == (first, second)
    assert latest_two["params"] == [{"param": "args.value", "a": 3, "b": 2.2}]
    assert [(g["gate"], g["changed"]) for g in latest_two["gates"]] == [
        ("value > 2", False),
        ("ci_low(score) > 2", True),
    ]

    chosen = only_stage(compare(capsys, "exp.yaml", "--stage", "train", "--keys", second[:6], first))
    assert (chosen["a"]["key"], chosen["b"]["key"]) == (second, first)
    assert {m["metric"]: round(m["delta"], 9) for m in chosen["metrics"]} == {"value": 0.8, "score": 0.8}

    assert main(["compare", "exp.yaml", "--stage", "train", "--keys", "zzz", first]) == 2
    err = capsys.readouterr().err
    assert "no complete run with key 'zzz'" in err and first in err and second in err


def _manifests(world: pytest.Pytester) -> list:
    """The train stage's manifests, oldest first (two may finish within one second)."""
    paths = (world.path / "runs/exp/default/train").glob("*/manifest.json")
    return sorted(
        paths, key=lambda p: (json.loads(p.read_text())["finished_at"], p.parent.stat().st_mtime_ns)
    )


def test_runs_of_two_git_commits(world, capsys):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")

    def git(*args: str) -> str:
        run = subprocess.run(["git", *args], cwd=world.path, capture_output=True, text=True, check=True)
        return run.stdout.strip()

    git("init", "-q")
    commits = []
    for value in (3, 5):
        world.makefile(".yaml", exp=spec(value))
        git("add", "exp.yaml", "steps.py")
        git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", f"value {value}")
        commits.append(git("rev-parse", "HEAD"))
        # a process per run: the manifest's commit is read once per process
        world.runpytest_subprocess("exp.yaml", "-p", "no:cacheprovider").assert_outcomes(passed=1)

    comparison = compare(capsys, "runs/exp/default", "--commits", "HEAD~1", commits[1][:8])
    assert (comparison["a"], comparison["b"]) == (f"commit {commits[0][:12]}", f"commit {commits[1][:12]}")
    stage = only_stage(comparison)
    assert (stage["a"]["git"]["commit"], stage["b"]["git"]["commit"]) == tuple(commits)
    assert stage["params"] == [{"param": "args.value", "a": 3, "b": 5}]

    assert main(["compare", "runs/exp/default", "--commits", "HEAD", "0badc0de"]) == 2
    assert "no stage has a run made at commit '0badc0de'" in capsys.readouterr().err


def test_nothing_to_compare_is_one_clear_message(world, capsys):
    world.makefile(".yaml", exp=spec(3))
    world.runpytest("exp.yaml").assert_outcomes(passed=1)
    assert main(["compare", "runs/exp/default"]) == 2
    assert "say what to compare" in capsys.readouterr().err
    assert main(["compare", "runs/exp/default/train"]) == 2
    assert "holds 1 complete run(s): nothing to compare" in capsys.readouterr().err
