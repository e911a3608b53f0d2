"""Spec validation through harness.core.experiment.load_experiment: every user error is a SpecError
that names the right line, and valid specs load."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import jsonschema
import pytest

from harness.core import registry
from harness.core.experiment import Experiment, load_experiment
from harness.spec.errors import SpecError
from harness.spec.validate import EXPERIMENT_SCHEMA

STEPS = "def f(ctx):\n    return {'m': 1}\n"

BASE = """\
seed: 1
stages:
  a:
    kind: python
    params:
      function: mysteps:f
      metrics: [m, n]
"""


@pytest.fixture
def spec(tmp_path):
    """Write a spec (dedented) next to a `mysteps.py` module; returns its path."""
    (tmp_path / "mysteps.py").write_text(STEPS)

    def spec(text: str, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return spec


def load_error(path: Path, profile: str | None = None) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_experiment(path, profile)
    assert "Traceback" not in str(info.value)
    return info.value


def lines_of(error: SpecError) -> list[int]:
    return [p.mark.line for p in error.problems]


def test_base_spec_loads(spec):
    experiment = load_experiment(spec(BASE))
    assert isinstance(experiment, Experiment)
    assert experiment.name == "spec" and experiment.seed == 1 and experiment.profile is None
    stage = experiment.stages["a"]
    assert stage.kind.name == "python" and stage.params["function"] == "mysteps:f"
    assert stage.mark.line == 3


def test_the_example_experiment_loads_with_and_without_its_profile():
    path = Path(__file__).resolve().parents[1] / "experiments" / "planted_signal.yaml"
    assert list(load_experiment(path).stages) == ["data", "probe"]
    assert load_experiment(path, "tiny").stages["data"].params["args"]["n"] == 400


@pytest.mark.parametrize(
    ("extra", "key", "hint", "line"),
    [
        ("sed: 3\n", "sed", "seed", 8),
        ("    gate: [m > 1]\n", "gate", "gates", 8),
        ("      functon: mysteps:g\n", "functon", "function", 8),
        ("      metric: [m]\n", "metric", "metrics", 8),
    ],
    ids=["top-level", "stage", "python-params", "python-params-2"],
)
def test_unknown_key_suggests_the_closest_name(spec, extra, key, hint, line):
    error = load_error(spec(BASE + extra))
    assert f"unknown key {key!r}; did you mean {hint!r}?" in str(error)
    assert lines_of(error) == [line]
    assert f"spec.yaml:{line}:" in str(error)


def test_unknown_key_without_a_close_match_lists_allowed_keys(spec):
    error = load_error(spec(BASE + "    zzzzzz: 1\n"))
    assert "unknown key 'zzzzzz'; allowed: kind, description, needs, params, gates" in str(error)


def test_several_problems_are_reported_together_in_line_order(spec):
    error = load_error(spec(BASE.replace("seed: 1", "seed: x") + "    gatez: []\nsed: 1\n"))
    assert lines_of(error) == [1, 8, 9]


@pytest.mark.parametrize(
    ("old", "new", "line", "message"),
    [
        ("seed: 1", "seed: one", 1, "'one' is not of type 'integer'"),
        ("seed: 1", "seed: -1", 1, "less than the minimum of 0"),
        ("seed: 1", "seed: 1.5", 1, "is not of type 'integer'"),
        ("      metrics: [m, n]", "      metrics: m", 7, "is not of type 'array'"),
        ("      metrics: [m, n]", "      metrics: [m, m]", 7, "non-unique"),
        ("      function: mysteps:f", "      function: 42", 6, "is not of type 'string'"),
        ("      function: mysteps:f", "      function: mysteps.f", 6, "does not match"),
        ("    kind: python", "    kind: [python]", 4, "is not of type 'string'"),
    ],
)
def test_wrong_types_point_at_the_value(spec, old, new, line, message):
    error = load_error(spec(BASE.replace(old, new)))
    assert message in str(error)
    assert lines_of(error) == [line]


@pytest.mark.parametrize("text", ["seed: 1\n", "stages: {}\n", "stages: [a]\n", "stages:\n"])
def test_stages_are_required_and_non_empty(spec, text):
    error = load_error(spec(text))
    assert "stages" in str(error)


@pytest.mark.parametrize("text", ["", "- a\n", "hello\n"])
def test_a_spec_must_be_a_mapping(spec, text):
    assert "a spec must be a YAML mapping" in str(load_error(spec(text)))


def test_missing_stage_kind(spec):
    error = load_error(spec("stages:\n  a:\n    params: {}\n"))
    assert "'kind' is a required property" in str(error) and lines_of(error) == [2]


def test_missing_function(spec):
    error = load_error(spec("stages:\n  a:\n    kind: python\n    params: {metrics: [m]}\n"))
    assert "'function' is a required property" in str(error) and lines_of(error) == [4]


@pytest.mark.parametrize(
    ("profile_body", "line", "message"),
    [
        ("    sede: 3\n", 11, "unknown key 'sede'; did you mean 'seed'?"),
        ("    seed: many\n", 11, "'many' is not of type 'integer'"),
        ("    stages:\n      a:\n        kindd: python\n", 13, "unknown key 'kindd'; did you mean 'kind'?"),
    ],
)
def test_errors_in_an_unselected_profile_are_reported(spec, profile_body, line, message):
    path = spec(BASE + "profiles:\n  ok: {seed: 2}\n  fast:\n" + profile_body)
    for profile in (None, "ok"):
        error = load_error(path, profile)
        assert message in str(error) and lines_of(error) == [line]


@pytest.mark.parametrize(
    ("profile_body", "line"),
    [
        ("        params:\n          functon: mysteps:f\n", 13),  # params schema of the kind
        ("        kind: pyton\n", 12),  # unknown kind
        ("        gates: ['m >']\n", 12),  # bad gate syntax
        ("        gates: ['zz > 1']\n", 12),  # gate on a metric the stage does not produce
    ],
)
def test_stage_level_errors_in_an_unselected_profile_are_reported(spec, profile_body, line):
    path = spec(BASE + "profiles:\n  fast:\n    stages:\n      a:\n" + profile_body)
    assert lines_of(load_error(path, "fast")) == [line]  # reported when selected ...
    assert lines_of(load_error(path)) == [line]  # ... and when not


def test_unknown_profile_is_an_error(spec):
    error = load_error(spec(BASE + "profiles:\n  fast: {seed: 2}\n"), "slow")
    assert "unknown profile 'slow'; this spec defines: fast" in str(error)


def test_selected_profile_is_applied(spec):
    path = spec(BASE + "profiles:\n  fast:\n    seed: 2\n    stages: {a: {params: {metrics: [m]}}}\n")
    experiment = load_experiment(path, "fast")
    assert experiment.seed == 2 and experiment.profile_dir == "fast"
    assert experiment.stages["a"].params == {"function": "mysteps:f", "metrics": ["m"]}
    assert load_experiment(path).profile_dir == "default"


def test_schemas_are_valid_draft_2020_12():
    jsonschema.Draft202012Validator.check_schema(json.loads(EXPERIMENT_SCHEMA.read_text()))
    kinds = registry.kinds()
    assert "python" in kinds
    for kind in kinds.values():
        schema = kind.params_schema
        if isinstance(schema, Path):
            schema = json.loads(schema.read_text())
        if schema is not None:
            jsonschema.Draft202012Validator.check_schema(schema)


def test_yaml_language_server_modeline_is_accepted(spec):
    modeline = "# yaml-language-server: $schema=../specs/experiment.schema.json\n"
    assert list(load_experiment(spec(modeline + BASE)).stages) == ["a"]


def test_unknown_stage_kind_lists_known_kinds(spec):
    error = load_error(spec(BASE.replace("kind: python", "kind: pyhton")))
    assert "unknown stage kind 'pyhton'; did you mean 'python'?" in str(error)
    assert "known kinds: " in str(error) and "python" in str(error).split("known kinds: ")[1]
    assert lines_of(error) == [4]


def test_unknown_stage_kind_without_close_match(spec):
    error = load_error(spec(BASE.replace("kind: python", "kind: zzzz")))
    assert "did you mean" not in str(error) and "known kinds: " in str(error)


GATED = BASE + "    gates:\n      - m > 1\n      - {gate}\n"


def test_gate_on_an_undeclared_metric_is_rejected_at_its_line(spec):
    error = load_error(spec(GATED.format(gate="acc > 0.5")))
    assert "gate on metric 'acc', which this stage kind does not produce (it produces: m, n)" in str(error)
    assert [(p.mark.line, p.mark.column) for p in error.problems] == [(10, 9)]


def test_a_difference_naming_an_undeclared_metric_is_rejected_at_its_line(spec):
    error = load_error(spec(GATED.format(gate="m - acc > 0.5")))
    assert "gate on metric 'acc', which this stage kind does not produce (it produces: m, n)" in str(error)
    assert [(p.mark.line, p.mark.column) for p in error.problems] == [(10, 9)]
    assert list(load_experiment(spec(GATED.format(gate="m - n > 0.5"))).stages) == ["a"]


def test_gates_need_declared_metrics(spec):
    error = load_error(spec(BASE.replace("metrics: [m, n]", "args: {}") + "    gates: [m > 1]\n"))
    assert "(it produces: none)" in str(error)


@pytest.mark.parametrize(
    ("gate", "column"),
    [
        ("m >> 1", 13),  # the second '>': the quote is at column 9, the gate text starts at 10
        ("m > 1 (abort > 2)", 23),
        ("m > 1 (abort < 2)", 23),
        ("m ~ 1", 12),
        ("ci_low(m > 1", 19),
    ],
)
@pytest.mark.parametrize("quote", ["'", '"', ""], ids=["single", "double", "plain"])
def test_bad_gate_syntax_points_at_the_gate_line_and_column(spec, gate, column, quote):
    error = load_error(spec(GATED.format(gate=f"{quote}{gate}{quote}")))
    column -= 0 if quote else 1
    assert f"bad gate {gate!r}" in str(error)
    problem = error.problems[0]
    assert (problem.mark.line, problem.mark.column) == (10, column)
    assert problem.where == "stages.a.gates[1]"


def test_gate_must_be_a_string(spec):
    error = load_error(spec(GATED.format(gate="{m: 1}")))
    assert "is not of type 'string'" in str(error) and lines_of(error) == [10]


def test_valid_gates_are_parsed_with_marks(spec):
    experiment = load_experiment(spec(GATED.format(gate="ci_low(n) >= 0.5 (abort < 0.1)")))
    gates = experiment.stages["a"].gates
    assert [(g.metric, g.bound, g.op, g.abort_op) for g in gates] == [
        ("m", None, ">", None),
        ("n", "ci_low", ">=", "<"),
    ]
    assert [g.mark.line for g in gates] == [9, 10]


def test_missing_input_file_is_an_error_at_its_line(spec, tmp_path):
    (tmp_path / "data.txt").write_text("x")
    path = spec(BASE + "      inputs:\n        data: data.txt\n        labels: missing.csv\n")
    error = load_error(path)
    assert "input not found: missing.csv" in str(error)
    assert lines_of(error) == [10]
    assert error.problems[0].where == "stages.a.params.inputs.labels"


def test_input_files_are_resolved_relative_to_the_spec(spec, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data.txt").write_text("x")
    experiment = load_experiment(spec(BASE + "      inputs: {data: sub/data.txt, dir: sub}\n"))
    assert experiment.stages["a"].inputs == {
        "inputs.data": tmp_path / "sub" / "data.txt",
        "inputs.dir": tmp_path / "sub",
    }


@pytest.mark.parametrize("name", ["x" * 300, '"a\\0b"'], ids=["name-too-long", "nul-byte"])
def test_unusable_input_path_is_a_spec_error(spec, name):
    error = load_error(spec(BASE + f"      inputs: {{data: {name}}}\n"))
    assert lines_of(error) == [8]


@pytest.mark.parametrize("function", ["nosuchmodule:f", "mysteps.sub:f", "sys:f"])
def test_function_whose_module_cannot_be_found(spec, function):
    error = load_error(spec(BASE.replace("mysteps:f", function)))
    assert f"cannot find module {function.split(':')[0]!r}" in str(error)
    assert lines_of(error) == [6] and error.problems[0].where == "stages.a.params.function"


def test_submodule_of_a_plain_module_cannot_be_found(spec):
    error = load_error(spec(BASE.replace("mysteps:f", "mysteps.json:f")))
    assert "cannot find module 'mysteps.json'" in str(error)


def test_module_in_a_package_next_to_the_spec_is_found(spec, tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "steps.py").write_text(STEPS)
    assert load_experiment(spec(BASE.replace("mysteps:f", "pkg.steps:f"))).stages["a"]


STAGE_B = "  b:\n    kind: python\n    params: {function: 'mysteps:f'}\n"


@pytest.mark.parametrize(
    ("needs", "line", "message"),
    [
        ("[aa]", 11, "unknown stage 'aa' in needs; did you mean 'a'?"),
        ("{src: zzz}", 11, "unknown stage 'zzz' in needs; stages are: a, b"),
        ("[b]", 11, "stage 'b' needs itself"),
    ],
)
def test_bad_needs(spec, needs, line, message):
    error = load_error(spec(BASE + STAGE_B + f"    needs: {needs}\n"))
    assert message in str(error) and lines_of(error) == [line]


@pytest.mark.parametrize(
    ("needs", "where"), [("[a, 1]", "stages.b.needs[1]"), ("{src: 1}", "stages.b.needs.src")]
)
def test_wrong_type_inside_needs_is_reported_in_the_branch_that_fits(spec, needs, where):
    error = load_error(spec(BASE + STAGE_B + f"    needs: {needs}\n"))
    assert error.problems[0].where == where
    assert "1 is not of type 'string'" in str(error)


def test_duplicate_needs_say_so(spec):
    error = load_error(spec(BASE + "    needs: [b, b]\n" + STAGE_B))
    assert "non-unique" in str(error)


def test_invalid_stage_name_points_at_the_name(spec):
    error = load_error(spec(BASE + "  9b:\n    kind: python\n"))
    assert "'9b' does not match" in str(error) and lines_of(error) == [8]


def test_needs_cycle_is_an_error(spec):
    error = load_error(spec(BASE + "    needs: {up: b}\n" + STAGE_B + "    needs: [a]\n"))
    assert "cycle in needs: a -> b -> a" in str(error) and lines_of(error) == [8]


def test_stages_are_in_dependency_order(spec):
    text = "stages:\n" + "".join(
        f"  {name}:\n    kind: python\n    params: {{function: 'mysteps:f'}}\n    needs: {needs}\n"
        for name, needs in [("c", "{x: b}"), ("a", "[]"), ("b", "[a]")]
    )
    experiment = load_experiment(spec(text))
    assert list(experiment.stages) == ["a", "b", "c"]
    assert experiment.stages["c"].needs == {"x": "b"} and experiment.stages["b"].needs == {"a": "a"}


# --- hostile names and numbers --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "line"),
    [
        ('  "b\\n":\n    kind: python\n', 8),  # a stage
        ('profiles:\n  "tiny\\n": {}\n', 9),
        ('experiment: "x\\n"\n', 8),
        ('    needs: {"up\\n": a}\n', 8),  # a role
    ],
    ids=["stage", "profile", "experiment", "role"],
)
def test_a_name_with_a_trailing_newline_is_refused(spec, extra, line):
    """Python's re.search lets `$` match before a final newline: "data\\n" made such a directory."""
    error = load_error(spec(BASE + extra))
    assert "does not match" in str(error) and lines_of(error) == [line]


@pytest.mark.parametrize(
    ("params", "line"),
    [
        ('{function: "mysteps:f\\n"}', 4),
        ('{function: mysteps:f, metrics: ["m\\n"]}', 4),
    ],
    ids=["function", "metric"],
)
def test_a_python_name_with_a_trailing_newline_is_refused(spec, params, line):
    error = load_error(spec(f"stages:\n  a:\n    kind: python\n    params: {params}\n"))
    assert "does not match" in str(error) and lines_of(error) == [line]


def test_schema_patterns_mean_the_same_in_python_and_ecma_262():
    """A schema's patterns are read by Python's `re` here and by ECMA-262 engines in editors:
    each anchors its end with a lookahead both read alike, never with `$`."""
    for path in sorted(EXPERIMENT_SCHEMA.parent.rglob("*.schema.json")):
        for pattern in re.findall(r'"pattern":\s*"((?:[^"\\]|\\.)*)"', path.read_text()):
            assert pattern.startswith("^") and pattern.endswith("(?![\\\\s\\\\S])"), (path.name, pattern)


@pytest.mark.parametrize(("seed", "ok"), [(2**32 - 1, True), (2**32, False), (2**63 - 1, False)])
def test_a_stage_seed_fits_what_numpy_and_sklearn_seed_with(spec, seed, ok):
    path = spec(BASE + f"    seed: {seed}\n")
    if ok:
        assert load_experiment(path).stages["a"].seed == seed
    else:
        assert "is greater than the maximum of 4294967295" in str(load_error(path))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (".nan", "`.nan` is not a finite number"),
        (".inf", "`.inf` is not a finite number"),
        ("9223372036854775808", "beyond a 64-bit integer"),
        ("2024-01-01", "read as a date"),
    ],
)
def test_numbers_json_cannot_hold_are_refused_in_params(spec, value, message):
    error = load_error(spec(BASE + f"      args: {{lr: {value}}}\n"))
    assert message in str(error) and lines_of(error) == [8]


def test_python_args_with_mixed_key_types_are_refused(spec):
    error = load_error(spec(BASE + "      args: {b: 1, 1: 2}\n"))
    assert "mapping keys must be strings: `1` is read as a int" in str(error) and lines_of(error) == [8]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("".join(f"  s{i}: {{kind: python}}\n" for i in range(256)), "at most 256 allowed, found 257"),
        ("profiles:\n" + "".join(f"  p{i}: {{}}\n" for i in range(17)), "at most 16 allowed, found 17"),
    ],
    ids=["stages", "profiles"],
)
def test_sizes_that_bound_collection_time_are_checked(spec, extra, message):
    """Collection checks the spec under every profile: these bounds keep it under a second
    (the worst case within them, 256 stages with gates, 16 profiles, 64 hypotheses: 0.6 s)."""
    assert message in str(load_error(spec(BASE + extra)))


@pytest.mark.parametrize("file", ["...yaml", "my spec.yaml", "v1.2.yaml", "-x.yaml"])
def test_a_file_name_that_is_not_a_valid_name_needs_experiment(spec, tmp_path, file):
    """The name names the store: a file `...yaml` was named `..` and stored outside --runs-dir."""
    error = load_error(spec(BASE, name=file))
    assert f"{Path(file).stem!r} is not a valid name" in str(error) and "set `experiment:`" in str(error)
    assert load_experiment(spec("experiment: fine\n" + BASE, name=file)).name == "fine"
