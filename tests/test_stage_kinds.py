"""Declaring a stage kind: the decorator's defaults, kinds from a conftest.py, kind modules
loaded when a spec uses them, the test kit, and the worked example of the docs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.api import StageError, stage_kind
from harness.core import registry
from harness.core.outcomes import Outcome, Status
from harness.spec.validate import SPECS_DIR
from harness.stages import python, train_probe
from harness.testing import run_kind

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "word_count"


def test_a_built_in_kind_is_named_after_its_module_with_its_schema_beside_the_others():
    assert registry.get("train_probe") is train_probe.run
    assert train_probe.run.name == "train_probe"
    assert train_probe.run.params_schema == SPECS_DIR / "stages" / "train_probe.schema.json"
    assert train_probe.run.fingerprint is None  # it loads no base model: no `base` param


def test_a_kind_whose_schema_has_a_base_gets_its_fingerprint_without_saying_so():
    kind = stage_kind(name="uses_base", schema={"properties": {"base": {"type": "string"}}})(lambda ctx: {})
    assert kind.fingerprint({"base": "/no/such/model"}) == "/no/such/model"  # a directory's listing else
    plain = stage_kind(name="plain", schema={"properties": {"text": {"type": "string"}}})(lambda ctx: {})
    assert plain.fingerprint is None
    opted_out = stage_kind(name="no_base", schema={"properties": {"base": {}}}, base=None)(lambda ctx: {})
    assert opted_out.fingerprint is None


def test_a_missing_default_schema_is_named_at_declaration():
    with pytest.raises(FileNotFoundError, match=r"'nowhere': no params schema at .*nowhere\.schema\.json"):
        stage_kind(name="nowhere")(lambda ctx: {})


def test_the_decorated_function_still_runs_as_itself():
    assert python.run.run.__name__ == "run" and python.run.module == "harness.stages.python"


def test_outcomes_are_written_as_their_words():
    assert json.dumps({"status": Status.REUSED, "outcome": Outcome.ABORTED}) == (
        '{"status": "reused", "outcome": "aborted"}'
    )
    assert f"{Outcome.PASSED:<8}|{Status.RAN}" == "passed  |ran" and Outcome.ERROR.upper() == "ERROR"


def test_a_stage_result_crosses_to_the_xdist_controller_as_plain_words(tmp_path):
    """Workers send reports through execnet, which serializes only plain types."""
    from execnet.gateway_base import dumps

    from harness.collect import run_payload
    from harness.core.execution import ExperimentRun
    from harness.core.experiment import load_experiment

    (tmp_path / "steps.py").write_text("def one(ctx):\n    return {'x': 1}\n")
    spec = tmp_path / "exp.yaml"
    spec.write_text('stages:\n  s: {kind: python, params: {function: "steps:one", metrics: [x]}}\n')
    run = ExperimentRun(load_experiment(spec), tmp_path / "runs")
    result = run.resolve("s")
    payload = run_payload(run, [result])
    dumps(payload)
    assert (payload["results"][0]["status"], payload["results"][0]["outcome"]) == ("ran", "passed")
    assert type(payload["results"][0]["status"]) is str


def test_the_kit_fills_defaults_and_holds_a_run_to_its_declared_metrics(tmp_path):
    seen = {}

    def counting(ctx):
        seen.update(ctx.params)
        return {"n": 1}

    schema = {"properties": {"a": {"type": "integer", "default": 3}}}
    kind = stage_kind(name="counting", schema=schema, metrics=("n",))(counting)
    result = run_kind(kind, {}, tmp_path / "out")
    assert seen == {"a": 3} and result.metrics == {"n": 1} and result.out_dir.is_dir()
    short = stage_kind(name="short", schema=None, metrics=("n", "m"))(counting)
    with pytest.raises(StageError, match="did not return the metrics it declares: m"):
        run_kind(short, {}, tmp_path / "short")


THROWAWAY = """
from harness.api import stage_kind

@stage_kind(name="triple", schema={"properties": {"x": {"type": "number"}}, "required": ["x"]},
            metrics=("tripled",))
def run(ctx):
    return {"tripled": 3 * ctx.params["x"]}

def pytest_harness_stage_kinds():
    return [run]
"""


def test_a_conftest_registers_a_throwaway_kind_for_its_session(pytester):
    pytester.makeconftest(THROWAWAY)
    pytester.makefile(".yaml", exp="stages:\n  t: {kind: triple, params: {x: 14}, gates: [tripled == 42]}\n")
    for _ in range(2):  # a second session in the process registers its own (pytester runs in-process)
        result = pytester.runpytest("exp.yaml", "--runs-dir", str(pytester.path / "runs"))
        result.assert_outcomes(passed=1)
    assert registry.get("triple") is None  # gone with the session that registered it


COLLECT_ONLY = """
import sys
from pathlib import Path
from harness.core.experiment import load_experiment

load_experiment(Path(sys.argv[1]))
print(sorted(m for m in sys.modules if m.startswith("harness.stages.")))
"""


def collect(spec: Path) -> subprocess.CompletedProcess:
    """Load the spec in a fresh process: which kind modules did that import?"""
    command = [sys.executable, "-c", COLLECT_ONLY, str(spec)]
    return subprocess.run(command, cwd=spec.parent, capture_output=True, text=True, timeout=120)


def test_collecting_a_spec_imports_only_the_kind_modules_it_uses(tmp_path):
    (tmp_path / "steps.py").write_text("def acts(ctx):\n    return {}\n")
    spec = tmp_path / "exp.yaml"
    spec.write_text(
        textwrap.dedent("""\
        stages:
          acts: {kind: python, params: {function: "steps:acts"}}
          probe: {kind: train_probe, needs: [acts], params: {label: truth}}
          typo: {kind: train_prob}
    """)
    )
    done = collect(spec)
    assert "unknown stage kind 'train_prob'; did you mean 'train_probe'?" in done.stderr
    spec.write_text("\n".join(spec.read_text().splitlines()[:-1]) + "\n")
    done = collect(spec)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "['harness.stages.python', 'harness.stages.train_probe']"


def test_the_worked_example_runs_end_to_end(pytester):
    for file in EXAMPLE.iterdir():
        if file.is_file():
            shutil.copy(file, pytester.path / file.name)
    runs = pytester.path / "runs"
    result = pytester.runpytest_subprocess("word_count.yaml", "test_word_count.py", "--runs-dir", str(runs))
    result.assert_outcomes(passed=5)  # its two stages and its three tests
    result.stdout.fnmatch_lines(["*ok   shared > 0.2*"])
    again = pytester.runpytest_subprocess("word_count.yaml", "--runs-dir", str(runs))
    again.stdout.fnmatch_lines(["*PASSED   poem*reused*", "*PASSED   notes*reused*"])
    poem = runs / "word_count" / "default" / "poem"
    rows = [json.loads(line) for line in (poem / (poem / "LATEST").read_text().strip() / "top.jsonl").open()]
    assert rows[0] == {"word": "the", "count": 8}
