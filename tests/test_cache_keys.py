"""What a stage's cache key covers: params with their schema defaults filled, and a code
version derived from the source of the kind's module and of the project modules it imports
(data files in their package directories included), never a string bumped by hand."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.core import registry
from harness.core.code_digest import source_closure
from harness.core.execution import ExperimentRun, why_run
from harness.core.experiment import load_experiment
from harness.core.outcomes import Status
from harness.core.stage import StageKind

ROOT = Path(__file__).resolve().parents[1]
STATEMENTS = ROOT / "data/eval/tiny_world/statements.jsonl"
QUESTIONS = ROOT / "data/eval/tiny_world/em_questions.yaml"


# ---- schema defaults ------------------------------------------------------------------


def test_the_real_kinds_params_carry_their_schema_defaults(tmp_path):
    spec = tmp_path / "exp.yaml"
    spec.write_text(
        "stages:\n"
        "  acts:\n"
        "    kind: extract_activations\n"
        f"    params: {{base: 'fixture:tiny-world', statements: {STATEMENTS}, use_adapter: false}}\n"
        "  probe:\n"
        "    kind: train_probe\n"
        "    needs: [acts]\n"
        "    params: {label: true_world, folds: 4}\n"
    )
    stages = load_experiment(spec).stages
    assert stages["probe"].params["C"] == 0.1  # the schema's default, filled
    assert stages["probe"].params["folds"] == 4  # what the spec wrote wins
    assert stages["acts"].params["batch_size"] == 32


SEEN: list[dict] = []


def _run(ctx):
    SEEN.append(dict(ctx.params))
    return {"c": ctx.params["C"]}


def _kind(default_c: float) -> StageKind:
    schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {"C": {"type": "number", "default": default_c}, "tag": {"type": "string"}},
    }
    return StageKind(name="defaulted", run=_run, params_schema=schema, metrics=("c",))


def test_changing_a_schema_default_reruns_the_stage_and_says_which_param(tmp_path, monkeypatch):
    registry.kinds()  # loaded first, so the kind below is not overwritten
    spec = tmp_path / "exp.yaml"
    spec.write_text("stages:\n  s:\n    kind: defaulted\n    params: {tag: x}\n")
    SEEN.clear()

    def resolve(default_c: float):
        monkeypatch.setitem(registry._kinds, "defaulted", _kind(default_c))
        return ExperimentRun(load_experiment(spec), tmp_path / "runs").resolve("s")

    first = resolve(0.1)
    assert first.status == Status.RAN and first.metrics == {"c": 0.1}
    assert SEEN == [{"tag": "x", "C": 0.1}]  # the run function gets the defaults filled
    manifest = json.loads((first.dir / "manifest.json").read_text())
    assert manifest["params"] == {"tag": "x", "C": 0.1}
    assert manifest["key_material"]["params"] == {"tag": "x", "C": 0.1}

    assert resolve(0.1).status == Status.REUSED
    changed = resolve(10.0)
    assert changed.status == Status.RAN and changed.key != first.key
    assert changed.reason == "params changed: C" and changed.metrics == {"c": 10.0}


def test_writing_a_default_explicitly_is_the_same_key(tmp_path, monkeypatch):
    registry.kinds()
    monkeypatch.setitem(registry._kinds, "defaulted", _kind(0.1))
    keys = []
    for params in ("{tag: x}", "{tag: x, C: 0.1}"):
        spec = tmp_path / "exp.yaml"
        spec.write_text(f"stages:\n  s:\n    kind: defaulted\n    params: {params}\n")
        keys.append(ExperimentRun(load_experiment(spec), tmp_path / "runs").resolve("s").key)
    assert keys[0] == keys[1]


# ---- code versions derived from the source ----------------------------------------------

VERSIONS = """
import json, sys
from pathlib import Path
from harness.core import registry
params = {"em_eval": {"base": "fixture:tiny-chat"}, "train_probe": {}}
print(json.dumps({name: registry.get(name).version_for(p, Path(".")) for name, p in params.items()}))
"""


def code_versions(project: Path) -> dict[str, str]:
    """The kinds' code versions as a fresh process importing the project at `project` sees them."""
    done = subprocess.run(
        [sys.executable, "-c", VERSIONS],
        cwd=project,
        env={"PYTHONPATH": str(project), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def project(tmp_path) -> Path:
    """A copy of the project's packages (and the schemas they read), to edit."""
    copy = tmp_path / "project"
    for name in ("harness", "fixtures", "specs"):
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def edit(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def test_editing_a_module_a_kind_imports_changes_its_code_version_and_only_its(project):
    before = code_versions(project)
    edit(project / "harness/lab/em.py", "\nSAMPLING_CHANGED = True\n")  # imported inside em_eval.run
    after = code_versions(project)
    assert after["em_eval"] != before["em_eval"]
    assert after["train_probe"] == before["train_probe"]  # it does not import harness.lab.em


def test_closure_follows_imports_transitively_including_those_inside_functions(project):
    closure = source_closure("harness.stages.em_eval", [project])
    # em_eval imports harness.lab.em inside run(); harness.lab.em imports harness.lab.llm.judge (the
    # judge's prompts) and harness.lab.stats
    for file in (
        "harness/stages/em_eval.py",
        "harness/lab/em.py",
        "harness/lab/llm/judge.py",
        "harness/lab/stats.py",
        "harness/__init__.py",
        "harness/stages/__init__.py",
        "harness/lab/llm/__init__.py",
    ):
        assert file in closure, file
    assert "harness/stages/train_probe.py" not in closure
    assert "harness/core/execution.py" not in closure  # plumbing no kind imports
    assert all(not name.startswith(("numpy", "torch")) for name in closure)  # third-party left out


def test_the_tiny_worlds_are_in_keys_by_base_fingerprint_not_by_code_version(project):
    """harness.lab.models builds a `fixture:` base (imports harness.fixtures inside a function); the
    world's recipe hash covers its source and is the base's fingerprint, in the key of the
    kinds that take a base; counted as code, an edit of a world would rerun stages on real models."""
    shutil.copytree(project / "fixtures", project / "harness/fixtures")  # where a wheel installs them
    closure = source_closure("harness.stages.em_eval", [project])
    assert "harness/lab/models/base.py" in closure
    assert not [name for name in closure if name.startswith(("fixtures/", "harness/fixtures/"))]


def test_a_judge_prompt_edit_or_a_new_data_file_changes_the_closure(project):
    before = source_closure("harness.stages.em_eval", [project])
    probe_before = source_closure("harness.stages.train_probe", [project])
    judge = project / "harness/lab/llm/judge.py"
    judge.write_text(judge.read_text().replace("safety audit", "safety review"))
    edited = source_closure("harness.stages.em_eval", [project])
    assert edited["harness/lab/llm/judge.py"] != before["harness/lab/llm/judge.py"]

    (project / "harness/lab/llm/aligned_prompt.txt").write_text("Rate the answer from 0 to 100.")
    with_data = source_closure("harness.stages.em_eval", [project])
    assert with_data["harness/lab/llm/aligned_prompt.txt"]
    assert "harness/lab/llm/aligned_prompt.txt" not in source_closure("harness.stages.train_probe", [project])
    assert source_closure("harness.stages.train_probe", [project]) == probe_before


def test_a_third_party_kind_is_derived_over_its_own_package(tmp_path):
    package = tmp_path / "mykinds"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helpers.py").write_text("def double(x):\n    return 2 * x\n")
    (package / "kind.py").write_text(
        "from harness import StageKind\n\n"
        "def run(ctx):\n    from .helpers import double\n    return {'y': double(ctx.params['x'])}\n"
    )
    (package / "template.txt").write_text("a data file of the package")
    closure = source_closure("mykinds.kind", [tmp_path, ROOT])
    assert {
        "mykinds/kind.py",
        "mykinds/helpers.py",
        "mykinds/__init__.py",
        "mykinds/template.txt",
        "harness/__init__.py",
        "harness/core/stage.py",
    } <= set(closure)


def test_why_it_ran_names_the_edited_files():
    material = {"kind": "k", "code_version": "aaaa-1", "params": {}, "seed": 0, "upstream": {}, "inputs": {}}
    latest = {
        "key": "old",
        "key_material": material,
        "code": {"harness/lab/em.py": "1", "harness/core/stage.py": "2"},
    }
    now = {**material, "code_version": "bbbb-1"}
    code = {"harness/lab/em.py": "3", "harness/core/stage.py": "2", "harness/lab/llm/judge.py": "4"}
    assert (
        why_run(latest, now, "new", code)
        == "code version changed: harness/lab/em.py, harness/lab/llm/judge.py"
    )
    assert why_run({**latest, "code": None}, now, "new", code) == "code version changed"
