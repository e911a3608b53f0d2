"""End-to-end tests of the pytest plugin, through pytester."""

from __future__ import annotations

import json
import shutil
import textwrap
import xml.etree.ElementTree as ET

import pytest

# Each stage appends "<experiment> <stage> <worker>" to calls.log: an independent witness
# of which stages really ran, in which order and on which xdist worker.
STEPS = """
import os, pathlib, random

LOG = pathlib.Path(__file__).with_name("calls.log")

def step(ctx):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with LOG.open("a") as f:
        f.write(f"{ctx.experiment} {ctx.stage} {worker}\\n")
    (ctx.out_dir / "partial.txt").write_text("half-way")
    if os.environ.get("DIE_IN") == ctx.stage:
        os.kill(os.getpid(), 9)
    if os.environ.get("FAIL_IN") == ctx.stage:
        raise RuntimeError("boom in " + ctx.stage)
    value = ctx.params.get("args", {}).get("value", 1)
    value += sum(up.metrics["value"] for up in ctx.upstream.values())
    (ctx.out_dir / "value.txt").write_text(str(value))
    return {"value": value, "draw": random.random()}
"""

SPEC = """\
seed: 1
stages:
  c:
    kind: python
    needs: [b]
    params: {function: "steps:step", metrics: [value, draw], args: {value: 100}}
    gates:
      - value > {c_gate}
  a:
    kind: python
    params: {function: "steps:step", metrics: [value, draw], args: {value: {a_value}}}
    gates:
      - value > {a_gate} (abort < {a_abort})
  b:
    kind: python
    needs: [a]
    params: {function: "steps:step", metrics: [value, draw], args: {value: {b_value}}}
"""


def spec(c_gate=0, a_value=1, a_gate=0, a_abort=-1, b_value=10) -> str:
    values = {"c_gate": c_gate, "a_value": a_value, "a_gate": a_gate, "a_abort": a_abort, "b_value": b_value}
    text = SPEC
    for name, value in values.items():
        text = text.replace("{" + name + "}", str(value))
    return text


@pytest.fixture
def world(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(steps=STEPS)
    pytester.makefile(".yaml", exp=spec())
    return pytester


def calls(pytester: pytest.Pytester) -> list[str]:
    log = pytester.path / "calls.log"
    lines = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return [line.split()[1] for line in lines]


def report(pytester: pytest.Pytester, experiment="exp", profile="default") -> dict:
    data = json.loads((pytester.path / "runs" / experiment / profile / "report.json").read_text())
    return {s["stage"]: s for s in data["stages"]}


def test_stages_run_in_dependency_order(world):
    result = world.runpytest("exp.yaml", "-v")
    result.assert_outcomes(passed=3)
    assert calls(world) == ["a", "b", "c"]
    result.stdout.re_match_lines([r".*exp.yaml::a PASSED", r".*exp.yaml::b PASSED", r".*exp.yaml::c PASSED"])
    stages = report(world)
    assert stages["c"]["metrics"]["value"] == 111  # c sees b's metrics, b sees a's
    assert [s["status"] for s in stages.values()] == ["ran"] * 3
    assert all(s["reason"] == "new" for s in stages.values())


def test_failing_gate_fails_item_with_metric_value_threshold_and_location(world):
    world.makefile(".yaml", exp=spec(c_gate=500))
    result = world.runpytest("exp.yaml")
    result.assert_outcomes(passed=2, failed=1)
    gate_line = spec(c_gate=500).splitlines().index("      - value > 500") + 1
    result.stdout.fnmatch_lines(
        [
            "*stage 'c'*1 of 1 gates failed*",
            f"*gate `value > 500` failed: measured value = 111, threshold > 500*exp.yaml:{gate_line}*",
        ]
    )
    assert "Traceback" not in result.stdout.str()


def test_abort_skips_every_downstream_stage(world):
    world.makefile(".yaml", exp=spec(a_gate=10, a_abort=5))  # a's value 1 < 5: abort
    result = world.runpytest("exp.yaml", "-rs")
    result.assert_outcomes(failed=1, skipped=2)
    assert calls(world) == ["a"]
    result.stdout.fnmatch_lines(["*ABORTED: measured value = 1*abort bound < 5*"])
    skipped = [line for line in result.stdout.lines if line.startswith("SKIPPED")]
    assert len(skipped) == 2  # reported at each skipped stage's own line
    assert all("upstream stage 'a' aborted" in line and "value > 10 (abort < 5)" in line for line in skipped)
    lines = spec().splitlines()
    assert [line.split()[2] for line in skipped] == [f"exp.yaml:{lines.index(f'  {s}:') + 1}:" for s in "bc"]
    assert report(world)["a"]["outcome"] == "aborted"


def test_failed_stage_skips_downstream(world, monkeypatch):
    monkeypatch.setenv("FAIL_IN", "b")
    result = world.runpytest("exp.yaml", "-rs")
    result.assert_outcomes(passed=1, failed=1, skipped=1)
    result.stdout.fnmatch_lines(
        ["*RuntimeError: boom in b*", "*upstream stage 'b' failed: RuntimeError: boom in b*"]
    )
    assert not list((world.path / "runs/exp/default/b").glob("[0-9a-f]*"))  # nothing stored under a key
    assert (world.path / "runs/exp/default/b").glob(".failed-*")


def test_second_run_reuses_every_stage(world):
    world.runpytest("exp.yaml").assert_outcomes(passed=3)
    first = report(world)
    calls(world)
    result = world.runpytest("exp.yaml")
    result.assert_outcomes(passed=3)
    assert calls(world) == []
    stages = report(world)
    assert [s["status"] for s in stages.values()] == ["reused"] * 3
    assert all(s["reason"].startswith("cache hit") for s in stages.values())
    assert {k: s["key"] for k, s in stages.items()} == {k: s["key"] for k, s in first.items()}
    markdown = (world.path / "runs/exp/default/report.md").read_text()
    assert markdown.count("| reused |") == 3
    result.stdout.fnmatch_lines(["*harness gates*", "*PASSED*a*reused*"])


def test_changing_a_param_reruns_that_stage_and_its_descendants_only(world):
    world.runpytest("exp.yaml").assert_outcomes(passed=3)
    calls(world)
    world.makefile(".yaml", exp=spec(b_value=20))
    world.runpytest("exp.yaml").assert_outcomes(passed=3)
    assert calls(world) == ["b", "c"]
    stages = report(world)
    assert stages["a"]["status"] == "reused"
    assert stages["b"]["reason"] == "params changed: args.value"
    assert stages["c"]["reason"] == "upstream changed: b"
    assert stages["c"]["metrics"]["value"] == 121


def test_changing_only_a_threshold_reruns_nothing(world):
    world.runpytest("exp.yaml").assert_outcomes(passed=3)
    calls(world)
    world.makefile(".yaml", exp=spec(c_gate=200))
    result = world.runpytest("exp.yaml")
    result.assert_outcomes(passed=2, failed=1)  # the stored metric now fails the new threshold
    assert calls(world) == []
    assert report(world)["c"]["status"] == "reused"


def test_stage_killed_half_way_leaves_nothing_reusable(world, monkeypatch):
    monkeypatch.setenv("DIE_IN", "b")
    killed = world.runpytest_subprocess("exp.yaml")
    assert killed.ret != 0
    assert calls(world) == ["a", "b"]
    store = world.path / "runs/exp/default/b"
    assert not (store / "LATEST").exists()
    assert [p.name for p in store.iterdir() if p.name.startswith(".tmp-")]  # the dead attempt
    assert not [p for p in store.iterdir() if not p.name.startswith(".")]  # nothing under a key

    monkeypatch.delenv("DIE_IN")
    world.runpytest("exp.yaml").assert_outcomes(passed=3)
    assert calls(world) == ["b", "c"]  # a was complete and is reused; b runs again
    assert report(world)["b"]["reason"] == "new"
    assert not [p for p in store.iterdir() if p.name.startswith(".tmp-")]


def test_two_experiments_run_on_two_xdist_workers(world):
    world.makefile(".yaml", other=spec(b_value=5))
    result = world.runpytest("exp.yaml", "other.yaml", "-n", "2", "--dist", "loadgroup")
    result.assert_outcomes(passed=6)
    lines = [line.split() for line in (world.path / "calls.log").read_text().splitlines()]
    by_experiment = {}
    for experiment, stage, worker in lines:
        by_experiment.setdefault(experiment, []).append((stage, worker))
    assert {e: [s for s, _ in rows] for e, rows in by_experiment.items()} == {
        "exp": ["a", "b", "c"],
        "other": ["a", "b", "c"],
    }
    workers = {e: {w for _, w in rows} for e, rows in by_experiment.items()}
    assert all(len(w) == 1 for w in workers.values())  # one experiment stays on one worker
    assert workers["exp"] != workers["other"]  # and the two ran on different workers
    assert report(world, "other")["c"]["metrics"]["value"] == 106  # controller wrote both reports
    assert report(world, "exp")["c"]["metrics"]["value"] == 111


def test_selecting_one_stage_runs_what_it_needs_first(world):
    result = world.runpytest("exp.yaml::c")
    result.assert_outcomes(passed=1)
    assert calls(world) == ["a", "b", "c"]
    assert set(report(world)) == {"a", "b", "c"}
    world.runpytest("exp.yaml::c").assert_outcomes(passed=1)
    assert calls(world) == []  # cached upstreams are reused, not rerun


def test_keyword_selection_and_collect_only(world):
    result = world.runpytest("exp.yaml", "--collect-only", "-q")
    result.stdout.fnmatch_lines(["exp.yaml::a", "exp.yaml::b", "exp.yaml::c"])
    assert not (world.path / "runs").exists()  # collecting runs nothing
    result = world.runpytest("exp.yaml", "-k", "b")
    result.assert_outcomes(passed=1, deselected=2)
    assert calls(world) == ["a", "b"]


def test_exitfirst_and_last_failed(world):
    world.makefile(".yaml", exp=spec(c_gate=500))
    world.runpytest("exp.yaml").assert_outcomes(passed=2, failed=1)
    calls(world)
    result = world.runpytest("exp.yaml", "--lf")
    result.assert_outcomes(failed=1, deselected=2)
    assert calls(world) == []
    world.makefile(".yaml", exp=spec(a_value=0))  # a fails its gate, without reaching the abort bound
    result = world.runpytest("exp.yaml", "-x", "--rerun", "all")
    result.assert_outcomes(failed=1)
    assert calls(world) == ["a"]


def test_rerun_forces_a_stage(world):
    world.runpytest("exp.yaml").assert_outcomes(passed=3)
    calls(world)
    world.runpytest("exp.yaml", "--rerun", "b").assert_outcomes(passed=3)
    # b is deterministic under the seed: same outputs, so c stays cached
    assert calls(world) == ["b"]
    stages = report(world)
    assert stages["b"]["reason"] == "forced by --rerun"
    assert stages["c"]["status"] == "reused"
    world.runpytest("exp.yaml", "--rerun", "all").assert_outcomes(passed=3)
    assert calls(world) == ["a", "b", "c"]


def test_seed_feeds_random_and_is_recorded(world):
    world.runpytest("exp.yaml").assert_outcomes(passed=3)
    draws = {k: s["metrics"]["draw"] for k, s in report(world).items()}
    world.runpytest("exp.yaml", "--rerun", "all").assert_outcomes(passed=3)
    assert {k: s["metrics"]["draw"] for k, s in report(world).items()} == draws
    world.makefile(".yaml", exp=spec().replace("seed: 1", "seed: 2"))
    world.runpytest("exp.yaml").assert_outcomes(passed=3)
    stages = report(world)
    assert stages["a"]["metrics"]["draw"] != draws["a"]
    assert stages["a"]["reason"] == "seed changed"
    manifest = json.loads(
        (world.path / "runs/exp/default/a" / stages["a"]["key"] / "manifest.json").read_text()
    )
    assert manifest["seed"] == 2


def test_a_stage_seed_replaces_the_experiments_for_that_stage_only(world):
    world.runpytest("exp.yaml").assert_outcomes(passed=3)
    draws = {k: s["metrics"]["draw"] for k, s in report(world).items()}
    seeded = spec().replace("  b:\n    kind: python\n", "  b:\n    kind: python\n    seed: 5\n")
    world.makefile(".yaml", exp=seeded)
    world.runpytest("exp.yaml").assert_outcomes(passed=3)
    stages = report(world)
    assert stages["a"]["status"] == "reused" and stages["b"]["reason"] == "seed changed"
    assert stages["b"]["metrics"]["draw"] != draws["b"]
    manifest = world.path / "runs/exp/default/b" / stages["b"]["key"] / "manifest.json"
    assert json.loads(manifest.read_text())["seed"] == 5


def test_manifest_records_provenance(world):
    world.makefile(".txt", corpus="some words here")
    world.makefile(
        ".yaml", exp=spec().replace("args: {value: 10}}", "args: {value: 10}, inputs: {corpus: corpus.txt}}")
    )
    world.runpytest("exp.yaml").assert_outcomes(passed=3)
    stages = report(world)
    b = json.loads((world.path / "runs/exp/default/b" / stages["b"]["key"] / "manifest.json").read_text())
    assert b["key"] == stages["b"]["key"] and b["complete"] is True
    assert b["params"]["args"] == {"value": 10}
    assert b["upstream"] == {"a": stages["a"]["key"]}
    assert set(b["key_material"]["inputs"]) == {"inputs.corpus"}
    assert len(b["key_material"]["inputs"]["inputs.corpus"]) == 64
    assert "python" in b["packages"] and "pytest" not in b["packages"]
    assert b["duration_s"] >= 0 and b["started_at"] <= b["finished_at"]
    assert b["reason"] == "new"
    metrics = json.loads(
        (world.path / "runs/exp/default/b" / stages["b"]["key"] / "metrics.json").read_text()
    )
    assert metrics["value"] == 11
    # editing an input file reruns the stage that reads it, and says why
    calls(world)
    world.makefile(".txt", corpus="other words")
    world.runpytest("exp.yaml").assert_outcomes(passed=3)
    assert calls(world) == ["b", "c"]
    assert report(world)["b"]["reason"] == "inputs changed: inputs.corpus"


def test_editing_the_step_module_reruns_its_stages(world):
    world.runpytest("exp.yaml").assert_outcomes(passed=3)
    calls(world)
    world.makepyfile(steps=STEPS + "\n# edited\n")
    world.runpytest("exp.yaml").assert_outcomes(passed=3)
    assert calls(world) == ["a", "b", "c"]
    assert report(world)["a"]["reason"] == "code version changed"


def test_metrics_in_junit_xml(world):
    world.runpytest("exp.yaml", "--junitxml=junit.xml").assert_outcomes(passed=3)
    tree = ET.parse(world.path / "junit.xml")
    props = {
        case.get("name"): {p.get("name"): p.get("value") for p in case.iter("property")}
        for case in tree.iter("testcase")
    }
    assert props["c"]["value"] == "111"
    assert props["c"]["harness.status"] == "ran"


def test_stage_item_location_is_its_line_in_the_yaml(world):
    items, _ = world.inline_genitems("exp.yaml")
    lines = spec().splitlines()
    assert [(item.name, item.location[1] + 1) for item in items] == [
        (name, lines.index(f"  {name}:") + 1) for name in ("a", "b", "c")
    ]
    assert items[0].location[0] == "exp.yaml"


def test_bad_spec_is_a_collection_error_with_location_and_no_traceback(world):
    world.makefile(".yaml", exp=spec().replace("    needs: [a]", "    nedds: [a]"))
    result = world.runpytest("exp.yaml")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    line = spec().splitlines().index("    needs: [a]") + 1
    result.stdout.fnmatch_lines(
        [
            f"*exp.yaml:{line}:5: stages.b: unknown key 'nedds'; did you mean 'needs'?",
            f"*> {line} |     nedds: ?a?",
        ]
    )
    assert "Traceback" not in result.stdout.str()
    assert "harness/" not in result.stdout.str()


def test_unknown_profile_lists_known_ones(world):
    world.makefile(".yaml", exp=spec() + "profiles:\n  tiny: {seed: 3}\n  small: {}\n")
    result = world.runpytest("exp.yaml", "--profile", "huge")
    result.stdout.fnmatch_lines(["*unknown profile 'huge'; this spec defines: small, tiny*"])
    world.runpytest("exp.yaml", "--profile", "tiny").assert_outcomes(passed=3)
    assert report(world, profile="tiny")["a"]["key"]


def test_a_spec_without_the_profile_is_skipped_in_a_directory_and_an_error_when_named(world):
    (world.path / "experiments").mkdir()
    shutil.copy(world.path / "steps.py", world.path / "experiments/steps.py")
    (world.path / "experiments/with.yaml").write_text(spec() + "profiles:\n  tiny: {seed: 3}\n")
    other = spec().replace("experiment: exp", "experiment: other")
    (world.path / "experiments/without.yaml").write_text(other)
    result = world.runpytest("experiments", "--profile", "tiny", "-rs")
    result.assert_outcomes(passed=3, skipped=1)
    result.stdout.fnmatch_lines(["*without.yaml: unknown profile 'tiny'; this spec defines: none*"])
    named = world.runpytest("experiments/without.yaml", "--profile", "tiny")
    assert named.ret == pytest.ExitCode.INTERRUPTED
    named.stdout.fnmatch_lines(["*unknown profile 'tiny'; this spec defines: none*"])


def test_runs_dir_option_and_ini(world):
    world.runpytest("exp.yaml", "--runs-dir", "elsewhere").assert_outcomes(passed=3)
    assert (world.path / "elsewhere/exp/default/report.json").exists()
    world.makeini("[pytest]\nharness_runs_dir = store\n")
    world.runpytest("exp.yaml").assert_outcomes(passed=3)
    assert (world.path / "store/exp/default/report.json").exists()
    assert not (world.path / "runs").exists()


def test_only_experiment_yaml_is_collected_from_directories(world):
    (world.path / "experiments").mkdir()
    (world.path / "experiments" / "exp2.yaml").write_text(spec())
    (world.path / "experiments" / "steps.py").write_text(STEPS)
    (world.path / "data.yaml").write_text("not: an experiment\n")
    world.makepyfile(test_plain="def test_ok():\n    pass\n")
    result = world.runpytest("--collect-only", "-q")
    result.stdout.fnmatch_lines(["experiments/exp2.yaml::a", "*test_plain.py::test_ok"])
    assert "data.yaml" not in result.stdout.str()


def test_third_party_stage_kind_from_an_entry_point(pytester):
    pytester.makepyfile(
        mykind=textwrap.dedent("""
        from harness import StageKind

        def run(ctx):
            return {"doubled": 2 * ctx.params["x"]}

        KIND = StageKind(
            name="doubler",
            run=run,
            params_schema={"type": "object", "properties": {"x": {"type": "number"}},
                           "required": ["x"], "additionalProperties": False},
            metrics=("doubled",),
        )
    """)
    )
    info = pytester.path / "mykind-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mykind\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[harness.stages]\ndoubler = mykind:KIND\n")
    pytester.makefile(
        ".yaml", exp="stages:\n  d:\n    kind: doubler\n    params: {x: 21}\n    gates: [doubled == 42]\n"
    )
    pytester.makefile(".yaml", bad="stages:\n  d:\n    kind: doubler\n    params: {x: 1, y: 2}\n")
    result = pytester.runpytest_subprocess("exp.yaml", "bad.yaml", "--continue-on-collection-errors")
    result.stdout.fnmatch_lines(["*bad.yaml:4:20: stages.d.params: unknown key 'y'; allowed: x"])
    result.assert_outcomes(passed=1, errors=1)
