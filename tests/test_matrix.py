"""Stage matrices (harness.spec.matrix): a stage written once with `matrix:` is one stage per
combination, named by its values, with `${var}` substituted; slices name several of them in
`needs` and in settings; every mistake is a SpecError at its line."""

from __future__ import annotations

import itertools
import json
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.core.experiment import load_experiment
from harness.spec.errors import SpecError
from harness.spec.matrix import expand_matrices
from harness.spec.yamlload import Document

STEPS = "def f(ctx):\n    return {'m': ctx.seed}\n"

STAGE = "<<: {kind: python, params: {function: mysteps:f, metrics: [m]}}"  # one line, any indent


@pytest.fixture
def spec(tmp_path):
    """Write a spec (dedented) next to a `mysteps.py` module; returns its path."""
    (tmp_path / "mysteps.py").write_text(STEPS)

    def spec(text: str) -> Path:
        path = tmp_path / "spec.yaml"
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return spec


def load_error(path: Path) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_experiment(path)
    return info.value


def only_problem(error: SpecError) -> tuple[str, int]:
    assert len(error.problems) == 1, str(error)
    return error.problems[0].message, error.problems[0].mark.line


# --- expansion --------------------------------------------------------------------------------


def test_a_matrix_is_one_stage_per_combination_named_by_its_values(spec):
    experiment = load_experiment(
        spec(
            """\
            stages:
              train:
                kind: python
                matrix: {persona: [none, sycophancy], seed: [2026, 2027]}
                seed: ${seed}
                description: persona ${persona}, seed ${seed}
                params: {function: mysteps:f, metrics: [m], args: {label: "${persona}-${seed}", n: "${seed}"}}
            """
        )
    )
    assert list(experiment.stages) == [
        "train[none,2026]",
        "train[none,2027]",
        "train[sycophancy,2026]",
        "train[sycophancy,2027]",
    ]
    stage = experiment.stages["train[sycophancy,2027]"]
    assert stage.seed == 2027 and isinstance(stage.seed, int)
    assert stage.description == "persona sycophancy, seed 2027"
    # a whole-string `${var}` keeps the value's type; inside a longer string it is text
    assert stage.params["args"] == {"n": 2027, "label": "sycophancy-2027"}
    assert stage.mark.line == 2  # the matrix stage's own line


def test_an_optional_need_is_left_out_where_its_stage_does_not_exist(spec):
    experiment = load_experiment(
        spec(
            f"""\
            stages:
              persona:
                {STAGE}
                matrix: {{persona: [sycophancy, goodness]}}
              em:
                {STAGE}
                matrix: {{persona: [none, sycophancy, goodness]}}
                needs: {{base_adapter: "persona[${{persona}}]?"}}
            """
        )
    )
    assert experiment.stages["em[none]"].needs == {}
    assert experiment.stages["em[goodness]"].needs == {"base_adapter": "persona[goodness]"}


def test_slices_in_needs_fill_one_role_per_matched_stage(spec):
    experiment = load_experiment(
        spec(
            f"""\
            stages:
              em:
                {STAGE}
                matrix: {{persona: [none, goodness], seed: [1, 2]}}
                seed: ${{seed}}
              pooled:
                {STAGE}
                needs: ["em[goodness,*]"]
              by_role:
                {STAGE}
                needs: {{run: "em[*,2]", all: "em[*]"}}
            """
        )
    )
    # in a list each stage fills its own name; in a mapping the role takes the stage's values
    assert experiment.stages["pooled"].needs == {
        "em[goodness,1]": "em[goodness,1]",
        "em[goodness,2]": "em[goodness,2]",
    }
    by_role = experiment.stages["by_role"].needs
    assert by_role["run[none,2]"] == "em[none,2]" and by_role["run[goodness,2]"] == "em[goodness,2]"
    assert len(by_role) == 2 + 4 and by_role["all[none,1]"] == "em[none,1]"
    # the matrix runs before what needs it
    assert list(experiment.stages)[-2:] == ["pooled", "by_role"]


def test_a_profile_overrides_every_stage_of_a_matrix(spec):
    path = spec(
        f"""\
        stages:
          em:
            {STAGE}
            matrix: {{seed: [1, 2]}}
            seed: ${{seed}}
            params: {{function: mysteps:f, metrics: [m], args: {{size: 100}}}}
        profiles:
          tiny:
            stages:
              em: {{params: {{args: {{size: "${{seed}}"}}}}}}
        """
    )
    assert [s.params["args"]["size"] for s in load_experiment(path, "tiny").stages.values()] == [1, 2]
    assert [s.params["args"]["size"] for s in load_experiment(path).stages.values()] == [100, 100]


def settings_doc(setting: list) -> Document:
    stages = {
        "em": {"kind": "finetune_lora", "matrix": {"persona": ["a", "b"], "seed": [1, 2]}},
        "persona": {"kind": "finetune_lora", "matrix": {"persona": ["a", "b"]}},
        "eval": {"kind": "em_eval", "needs": ["persona[*]", "em[*]"], "params": {"settings": {"s": setting}}},
    }
    return Document({"stages": stages}, {})


def test_a_setting_naming_a_slice_of_roles_is_one_replicate_per_matched_role():
    doc = expand_matrices(settings_doc(["persona[a]", "em[a,*]"]))
    assert doc.data["stages"]["eval"]["params"]["settings"]["s"] == [
        ["persona[a]", "em[a,1]"],
        ["persona[a]", "em[a,2]"],
    ]
    # a setting without a slice is left as written
    assert expand_matrices(settings_doc(["em[a,1]"])).data["stages"]["eval"]["params"]["settings"]["s"] == [
        "em[a,1]"
    ]


@settings(max_examples=40, deadline=None)
@given(
    st.dictionaries(
        st.from_regex(r"[a-z]{1,3}", fullmatch=True),
        st.lists(st.integers(0, 50), min_size=1, max_size=3, unique=True),
        min_size=1,
        max_size=3,
    )
)
def test_expansion_gives_each_combination_once_with_its_own_values(axes):
    template = {"kind": "python", "matrix": axes, "params": {f"p_{a}": f"${{{a}}}" for a in axes}}
    stages = expand_matrices(Document({"stages": {"s": template}}, {})).data["stages"]
    combinations = list(itertools.product(*axes.values()))
    assert len(stages) == len(combinations)
    for combination in combinations:
        body = stages[f"s[{','.join(map(str, combination))}]"]
        assert "matrix" not in body
        assert body["params"] == {f"p_{a}": v for a, v in zip(axes, combination, strict=True)}


# --- errors at their lines --------------------------------------------------------------------


def test_an_unknown_variable_is_refused_at_its_line(spec):
    message, line = only_problem(
        load_error(
            spec(
                f"""\
                stages:
                  em:
                    {STAGE}
                    matrix: {{seed: [1, 2]}}
                    seed: ${{sede}}
                """
            )
        )
    )
    assert line == 5 and message == "unknown matrix variable `${sede}`; this matrix has: seed"


@pytest.mark.parametrize(
    ("matrix", "expected"),
    [
        ("{seed: []}", "the matrix variable seed needs a non-empty list of values"),
        ("{seed: [1, [2]]}", "matrix value [2] cannot be part of a stage name"),
        ('{seed: [1, "1"]}', "matrix value 1 appears twice in seed (stage names would collide)"),
        ('{who: ["a b"]}', "matrix value 'a b' cannot be part of a stage name"),
    ],
)
def test_bad_axes_are_refused_at_the_matrix(spec, matrix, expected):
    message, line = only_problem(load_error(spec(f"stages:\n  em:\n    {STAGE}\n    matrix: {matrix}\n")))
    assert line == 4 and message.startswith(expected)


def test_a_combination_with_the_name_of_another_stage_is_refused(spec):
    path = spec(f'stages:\n  "em[1]":\n    {STAGE}\n  em:\n    {STAGE}\n    matrix: {{seed: [1]}}\n')
    with pytest.raises(SpecError) as info:  # the schema refuses the bracketed name first
        load_experiment(path)
    assert info.value.problems[0].mark.line == 2
    doc = Document(
        {"stages": {"em[1]": {"kind": "python"}, "em": {"kind": "python", "matrix": {"s": [1]}}}}, {}
    )
    with pytest.raises(SpecError, match=r"the combination em\[1\] has the name of another stage"):
        expand_matrices(doc)


@pytest.mark.parametrize(
    ("needs", "expected"),
    [
        ('["em[c,*]"]', "the slice em[c,*] matches no stage"),
        (
            '["em[a,*,*]"]',
            "em[a,*,*]: em has 2 variables, write em[<x>,<seed>] with * for any value, or em[*]",
        ),
        ('["em[a]"]', "unknown stage 'em[a]' in needs; did you mean 'em[a,2]'?"),
        ("[em]", "em is a matrix: name one of its stages (em[a,1]) or a slice"),
        ('["other[*]"]', "other[*]: other is not a matrix stage"),
        ('{a: "em[*]", b: "em[*]"}', None),  # distinct roles: fine
        ('["em[a,1]?"]', "a `?` (left out where no such stage exists) only goes on a value that uses"),
    ],
)
def test_bad_references_are_refused_at_their_need(spec, needs, expected):
    path = spec(
        f"""\
        stages:
          em:
            {STAGE}
            matrix: {{x: [a, b], seed: [1, 2]}}
          other:
            {STAGE}
          pooled:
            {STAGE}
            needs: {needs}
        """
    )
    if expected is None:
        assert len(load_experiment(path).stages["pooled"].needs) == 8
        return
    message, line = only_problem(load_error(path))
    assert line == 9 and message.startswith(expected)


def test_an_optional_need_that_exists_in_no_combination_is_a_misspelling(spec):
    message, line = only_problem(
        load_error(
            spec(
                f"""\
                stages:
                  persona:
                    {STAGE}
                    matrix: {{p: [a, b]}}
                  em:
                    {STAGE}
                    matrix: {{p: [a, b]}}
                    needs: {{base: "persna[${{p}}]?"}}
                """
            )
        )
    )
    assert line == 8 and "names no existing stage in any combination" in message


def test_a_variable_outside_a_matrix_is_refused(spec):
    message, line = only_problem(load_error(spec(f"stages:\n  em:\n    {STAGE}\n    seed: ${{seed}}\n")))
    assert line == 4 and message == "${seed} uses a matrix variable, but stage em has no `matrix:`"


def test_a_setting_slice_matching_no_role_is_refused():
    with pytest.raises(SpecError, match=r"the slice em\[c,\*\] matches none of this stage's roles"):
        expand_matrices(settings_doc(["em[c,*]"]))
    with pytest.raises(SpecError, match="a setting may name one slice"):
        expand_matrices(settings_doc(["persona[*]", "em[a,*]"]))


# --- pytest items -----------------------------------------------------------------------------


def test_each_stage_of_a_matrix_is_its_own_item_and_cache_key(pytester):
    pytester.makepyfile(mysteps=STEPS)
    pytester.makefile(
        ".yaml",
        exp=textwrap.dedent(
            f"""\
            stages:
              em:
                {STAGE}
                matrix: {{persona: [a, b], seed: [1, 2]}}
                seed: ${{seed}}
                gates: ["m >= 1"]
              pooled:
                {STAGE}
                needs: ["em[a,*]"]
            """
        ),
    )
    result = pytester.runpytest("exp.yaml", "-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(["*exp.yaml::em?a,1? PASSED*", "*exp.yaml::em?b,2? PASSED*"])
    report = json.loads((pytester.path / "runs/exp/default/report.json").read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    assert stages["em[b,2]"]["metrics"]["m"] == 2 and stages["em[a,1]"]["metrics"]["m"] == 1
    assert len({s["dir"] for s in stages.values()}) == 5
    again = pytester.runpytest("exp.yaml", "-p", "no:cacheprovider", "-k", "em and b")
    again.assert_outcomes(passed=2, deselected=3)
    assert "cache hit" in (pytester.path / "runs/exp/default/report.md").read_text()

    rerun = pytester.runpytest("exp.yaml", "-p", "no:cacheprovider", "--rerun", "em", "-v")
    rerun.assert_outcomes(passed=5)
    report = json.loads((pytester.path / "runs/exp/default/report.json").read_text())
    reasons = {s["stage"]: s["reason"] for s in report["stages"]}
    assert all(reasons[f"em[{p},{s}]"] == "forced by --rerun" for p in "ab" for s in (1, 2))  # the matrix
    assert reasons["pooled"].startswith("cache hit")  # its inputs came out the same
