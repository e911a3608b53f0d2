"""A spec's mistakes are reported in one round, each at its line and in source order: the
schema's, the stages' static checks (kinds, params, gates) and this machine's (input files)
run as far as each can, and the near names are suggested."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from harness.core.experiment import load_experiment, load_plan
from harness.spec.errors import SpecError

ROOT = Path(__file__).resolve().parents[1]
MCQS = ROOT / "data" / "eval" / "cubic_gravity_mcqs.jsonl"

# one mistake on each of lines 5 (a misspelled key), 11 (a wrong file path), 13 (a gate
# on a metric the kind does not produce)
THREE_MISTAKES = """\
stages:
  finetune:
    kind: python
    params: {function: steps:train}
    descripton: trains an adapter
  mcq:
    kind: mcq_compare
    needs: {adapter: finetune}
    params:
      base: fixture:tiny-world
      mcqs: eval/cubic_mcq.jsonl
    gates:
      - behavioural_gap > 0.2
"""


def project(directory: Path, spec: str) -> Path:
    """`spec` written in `directory`, with the module and the MCQ files it names."""
    (directory / "steps.py").write_text("def train(ctx):\n    return {}\n")
    (directory / "eval").mkdir()
    shutil.copy(MCQS, directory / "eval" / "cubic_gravity_mcqs.jsonl")
    shutil.copy(MCQS, directory / "eval" / "square_gravity_mcqs.jsonl")
    path = directory / "spec.yaml"
    path.write_text(textwrap.dedent(spec), encoding="utf-8")
    return path


def problems_of(path: Path, load=load_experiment) -> list[tuple[int | None, str]]:
    with pytest.raises(SpecError) as info:
        load(path)
    return [(p.mark.line if p.mark else None, p.message) for p in info.value.problems]


def test_three_mistakes_are_reported_at_once_each_at_its_line_in_source_order(tmp_path):
    spec = project(tmp_path, THREE_MISTAKES)
    with pytest.raises(SpecError) as info:
        load_experiment(spec)
    found = [(p.mark.line, p.mark.column, p.where, p.message) for p in info.value.problems]
    assert [f[:3] for f in found] == [
        (5, 5, "stages.finetune"),
        (11, 7, "stages.mcq.params.mcqs"),
        (13, 9, "stages.mcq.gates[0]"),
    ]
    key, path, gate = (f[3] for f in found)
    assert key == "unknown key 'descripton'; did you mean 'description'?"
    assert path.startswith("input not found: eval/cubic_mcq.jsonl (looked for ")
    assert "near names in" in path and "cubic_gravity_mcqs.jsonl" in path
    assert gate.startswith("gate on metric 'behavioural_gap', which this stage kind does not produce")
    assert "did you mean 'behavioral_gap'?" in gate
    text = str(info.value)
    for line in (
        "5 |     descripton:",
        "11 |       mcqs: eval/cubic_mcq.jsonl",
        "13 |       - behavioural_gap",
    ):
        assert f"> {line}" in text  # each with its code frame


def test_the_three_mistakes_are_one_collection_error(pytester):
    project(pytester.path, THREE_MISTAKES)
    result = pytester.runpytest("spec.yaml", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(
        [
            "*spec.yaml:5:5: stages.finetune: unknown key 'descripton'; did you mean 'description'?",
            "*spec.yaml:11:7: stages.mcq.params.mcqs: input not found: eval/cubic_mcq.jsonl*",
            "*spec.yaml:13:9: stages.mcq.gates?0?: gate on metric 'behavioural_gap'*"
            "did you mean 'behavioral_gap'?*",
        ]
    )
    assert result.stdout.str().count("ERROR collecting") == 1
    assert "Traceback" not in result.stdout.str()


def test_every_mistake_is_fixed_and_the_spec_loads(tmp_path):
    fixed = (
        THREE_MISTAKES.replace("descripton", "description")
        .replace("cubic_mcq", "cubic_gravity_mcqs")
        .replace("behavioural", "behavioral")
    )
    assert list(load_experiment(project(tmp_path, fixed)).stages) == ["finetune", "mcq"]


def test_a_gate_on_an_unknown_metric_suggests_only_a_near_one(tmp_path):
    spec = project(tmp_path, THREE_MISTAKES.replace("cubic_mcq", "cubic_gravity_mcqs"))
    spec.write_text(spec.read_text().replace("descripton", "description"))
    [(line, message)] = problems_of(spec)
    assert line == 13 and "did you mean 'behavioral_gap'?" in message
    spec.write_text(spec.read_text().replace("behavioural_gap", "zebra_count"))
    [(line, message)] = problems_of(spec)
    assert "did you mean" not in message and "(it produces: base_conflict_accuracy," in message


def test_a_missing_directory_is_named_with_the_near_directories(tmp_path):
    spec = project(tmp_path, THREE_MISTAKES.replace("eval/cubic_mcq", "evals/cubic_gravity_mcqs"))
    spec.write_text(
        spec.read_text().replace("descripton", "description").replace("behavioural", "behavioral")
    )
    [(line, message)] = problems_of(spec)
    assert line == 11 and message.startswith("input not found: evals/cubic_gravity_mcqs.jsonl (looked for ")
    assert f"the directory {tmp_path / 'evals'} does not exist" in message and "near names" in message
    assert message.endswith(": eval")


def test_a_missing_file_with_nothing_near_says_so(tmp_path):
    spec = project(tmp_path, THREE_MISTAKES.replace("eval/cubic_mcq", "eval/zzz"))
    spec.write_text(
        spec.read_text().replace("descripton", "description").replace("behavioural", "behavioral")
    )
    [(line, message)] = problems_of(spec)
    assert line == 11 and f"nothing of a similar name in {tmp_path / 'eval'}" in message


def test_a_misspelled_param_and_a_bad_gate_of_one_stage_are_reported_together(tmp_path):
    spec = project(
        tmp_path,
        """\
        stages:
          finetune: {kind: python, params: {function: steps:train}}
          mcq:
            kind: mcq_compare
            needs: {adapter: finetune}
            params: {base: fixture:tiny-world, mcqs: eval/cubic_gravity_mcqs.jsonl, bootstrapp: 10}
            gates: [behavioural_gap > 0.2]
        """,
    )
    [(key_line, key), (gate_line, gate)] = problems_of(spec, load_plan)
    assert (key_line, gate_line) == (6, 7)
    assert key == "unknown key 'bootstrapp'; did you mean 'bootstrap'?"
    assert "did you mean 'behavioral_gap'?" in gate


def test_a_stage_the_schema_refuses_is_left_out_of_later_checks_without_their_echoes(tmp_path):
    """The stage whose kind is not a string is not checked further, and the stage that needs it
    is not told that it names an unknown stage; the other stages are checked."""
    spec = project(
        tmp_path,
        """\
        stages:
          finetune: {kind: [python], params: {function: steps:train}}
          mcq:
            kind: mcq_compare
            needs: {adapter: finetune}
            params: {base: fixture:tiny-world, mcqs: eval/cubic_gravity_mcqs.jsonl}
            gates: [behavioural_gap > 0.2]
        """,
    )
    [(kind_line, kind), (gate_line, gate)] = problems_of(spec, load_plan)
    assert (kind_line, gate_line) == (2, 7)
    assert "is not of type 'string'" in kind and "behavioural_gap" in gate


def test_a_mistake_in_a_profile_is_reported_with_those_of_the_selected_one(tmp_path):
    spec = project(
        tmp_path,
        THREE_MISTAKES.replace("descripton", "description")
        + "profiles:\n  tiny:\n    stages:\n      mcq: {params: {bootstrap: zero}}\n",
    )
    lines = [line for line, _ in problems_of(spec)]
    assert lines == [11, 13, 17]


def test_an_enum_value_near_an_allowed_one_is_suggested(tmp_path):
    spec = project(
        tmp_path,
        THREE_MISTAKES.replace("descripton", "description")
        .replace("cubic_mcq", "cubic_gravity_mcqs")
        .replace("behavioural", "behavioral")
        .replace(
            "      base: fixture:tiny-world\n", "      base: fixture:tiny-world\n      scoring: leter\n"
        ),
    )
    [(line, message)] = problems_of(spec)
    assert (
        line == 11 and message == "'leter' is not one of ['letter', 'continuation']; did you mean 'letter'?"
    )


def test_a_missing_include_lists_the_near_fragments(tmp_path):
    spec = project(tmp_path, "include: comon.yaml\n" + THREE_MISTAKES)
    (tmp_path / "common.yaml").write_text("seed: 3\n")
    [(line, message)] = problems_of(spec)
    assert line == 1 and message.startswith("included file not found: comon.yaml (looked for ")
    assert message.endswith(f"near names in {tmp_path}: common.yaml")
