"""harness.spec.compose: `include:` fragments and `profiles:` overrides, with marks kept."""

from __future__ import annotations

import os
import textwrap

import pytest

from harness.spec.compose import apply_profile, load_with_includes
from harness.spec.errors import Mark, SpecError
from harness.spec.validate import EXPERIMENT_SCHEMA, check


@pytest.fixture
def write(tmp_path):
    def write(name: str, text: str):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write


def line_of(path, text: str) -> int:
    """1-based number of the first line of `path` containing `text`."""
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


# --- include ---------------------------------------------------------------------------------------


def test_include_as_string_merges_the_fragment_under_the_file(write):
    write("common.yaml", "seed: 1\ndescription: from fragment\nstages: {a: {kind: python}}\n")
    main = write("main.yaml", "include: common.yaml\nseed: 2\nstages: {b: {kind: python}}\n")
    doc = load_with_includes(main)
    assert doc.data == {
        "seed": 2,  # the including file overrides the fragment
        "description": "from fragment",
        "stages": {"a": {"kind": "python"}, "b": {"kind": "python"}},
    }
    assert "include" not in doc.data
    assert not any(p[:1] == ("include",) for p in doc.marks)


def test_include_list_later_fragments_override_earlier_ones(write):
    write("one.yaml", "seed: 1\nexperiment: one\n")
    write("two.yaml", "seed: 2\n")
    main = write("main.yaml", "include: [one.yaml, two.yaml]\nstages: {a: {kind: python}}\n")
    data = load_with_includes(main).data
    assert data["seed"] == 2 and data["experiment"] == "one"


def test_includes_are_relative_to_the_including_file(write):
    write("b.yaml", "experiment: decoy\n")  # must not be picked up by frag/a.yaml
    write("frag/b.yaml", "experiment: nested\nseed: 5\n")
    write("frag/a.yaml", "include: b.yaml\nseed: 4\n")
    main = write("main.yaml", "include: frag/a.yaml\nstages: {a: {kind: python}}\n")
    data = load_with_includes(main).data
    assert data["experiment"] == "nested" and data["seed"] == 4


def test_diamond_include_is_not_a_cycle(write):
    write("base.yaml", "seed: 3\n")
    write("left.yaml", "include: base.yaml\n")
    write("right.yaml", "include: base.yaml\n")
    main = write("main.yaml", "include: [left.yaml, right.yaml]\nstages: {a: {kind: python}}\n")
    assert load_with_includes(main).data["seed"] == 3


def test_include_cycle_names_the_chain_and_points_at_the_include(write):
    write("a.yaml", "include: b.yaml\n")
    b = write("b.yaml", "seed: 1\ninclude:\n  - c.yaml\n  - a.yaml\n")
    main = write("main.yaml", "stages: {x: {kind: python}}\ninclude: a.yaml\n")
    write("c.yaml", "seed: 2\n")
    with pytest.raises(SpecError) as info:
        load_with_includes(main)
    message = str(info.value)
    assert "include cycle: main.yaml -> a.yaml -> b.yaml -> a.yaml" in message
    mark = info.value.problems[0].mark
    assert (mark.file, mark.line) == (b, 4)
    assert "> 4 |   - a.yaml" in message


def test_a_file_including_itself_is_a_cycle(write):
    main = write("main.yaml", "include: main.yaml\n")
    with pytest.raises(SpecError, match=r"include cycle: main\.yaml -> main\.yaml"):
        load_with_includes(main)


def test_missing_include_points_at_the_include_line(write):
    write("there.yaml", "seed: 1\n")
    main = write("main.yaml", "stages: {}\ninclude:\n  - there.yaml\n  - gone.yaml\n")
    with pytest.raises(SpecError) as info:
        load_with_includes(main)
    assert "included file not found: gone.yaml" in str(info.value)
    mark = info.value.problems[0].mark
    assert (mark.file, mark.line, mark.column) == (main, 4, 5)


@pytest.mark.parametrize("name", ['"a\\0b.yaml"', "x" * 300 + ".yaml"], ids=["nul-byte", "name-too-long"])
def test_unusable_include_path_is_a_spec_error(write, name):
    main = write("main.yaml", f"stages: {{}}\ninclude: {name}\n")
    with pytest.raises(SpecError) as info:
        load_with_includes(main)
    assert info.value.problems[0].mark.line == 2


@pytest.mark.parametrize("value", ["3", "[a.yaml, 3]", "{a: b}"])
def test_include_must_be_paths(write, value):
    write("a.yaml", "seed: 1\n")
    main = write("main.yaml", f"stages: {{}}\ninclude: {value}\n")
    with pytest.raises(SpecError, match="`include` must be a file path or a list of file paths") as info:
        load_with_includes(main)
    assert info.value.problems[0].mark.line == 2


def test_fragment_errors_point_into_the_fragment(write):
    frag = write("frag.yaml", "seed: 1\nseed: 2\n")
    main = write("main.yaml", "include: frag.yaml\n")
    with pytest.raises(SpecError) as info:
        load_with_includes(main)
    assert info.value.problems[0].mark.file == frag
    assert "frag.yaml:2:1" in str(info.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", ""])
def test_a_spec_or_fragment_must_be_a_mapping(write, text):
    write("frag.yaml", text)
    main = write("main.yaml", "include: frag.yaml\nstages: {}\n")
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        load_with_includes(main)


def test_marks_of_fragment_values_point_into_the_fragment(write):
    frag = write(
        "frag.yaml",
        """\
        stages:
          train:
            kind: python
            params:
              lr: 0.1
              epochs: 3
        """,
    )
    main = write(
        "main.yaml",
        """\
        include: frag.yaml
        stages:
          train:
            params:
              epochs: 9
        """,
    )
    doc = load_with_includes(main)
    assert doc.data["stages"]["train"] == {"kind": "python", "params": {"lr": 0.1, "epochs": 9}}
    lr = doc.mark(("stages", "train", "params", "lr"))
    assert (lr.file, lr.line) == (frag, line_of(frag, "lr:"))
    kind = doc.mark(("stages", "train", "kind"))
    assert (kind.file, kind.line) == (frag, 3)
    epochs = doc.mark(("stages", "train", "params", "epochs"))
    assert (epochs.file, epochs.line) == (main, line_of(main, "epochs:"))


# --- profiles --------------------------------------------------------------------------------------

PROFILED = """\
seed: 1
stages:
  train:
    kind: python
    params:
      args: {n: 100, dim: 8, extra: {a: 1, b: 2}}
      metrics: [acc, loss]
    gates: [acc > 0.5]
profiles:
  tiny:
    seed: 2
    stages:
      train:
        params:
          args: {n: 10, extra: {b: 3}}
          metrics: [acc]
  empty: {}
"""


@pytest.fixture
def profiled(write):
    path = write("main.yaml", PROFILED)
    return path, load_with_includes(path)


def test_no_profile_drops_profiles(profiled):
    _, doc = profiled
    base = apply_profile(doc, None)
    assert "profiles" not in base.data
    assert base.data["seed"] == 1
    assert not any(p[:1] == ("profiles",) for p in base.marks)


def test_profile_deep_merges_mappings_and_replaces_lists_and_scalars(profiled):
    _, doc = profiled
    data = apply_profile(doc, "tiny").data
    assert data["seed"] == 2
    train = data["stages"]["train"]
    assert train["params"]["args"] == {"n": 10, "dim": 8, "extra": {"a": 1, "b": 3}}
    assert train["params"]["metrics"] == ["acc"]  # replaced, not appended to
    assert train["gates"] == ["acc > 0.5"] and train["kind"] == "python"
    assert "profiles" not in data


def test_profile_does_not_mutate_the_document(profiled):
    _, doc = profiled
    apply_profile(doc, "tiny")
    assert doc.data["stages"]["train"]["params"]["args"]["n"] == 100
    assert apply_profile(doc, "empty").data == apply_profile(doc, None).data


def test_profile_marks_point_at_the_override(profiled):
    path, doc = profiled
    resolved = apply_profile(doc, "tiny")
    args = ("stages", "train", "params", "args")
    assert resolved.mark(("seed",)).line == 11
    assert resolved.mark(args + ("n",)).line == 15  # overridden in the profile
    assert resolved.mark(args + ("dim",)).line == 6  # kept from the base
    assert resolved.mark(("stages", "train", "params", "metrics", 0)).line == 16
    assert all(m.file == path for m in resolved.marks.values())


def test_unknown_profile_lists_known_profiles(profiled):
    _, doc = profiled
    with pytest.raises(SpecError, match=r"unknown profile 'tinny'; this spec defines: empty, tiny") as info:
        apply_profile(doc, "tinny")
    assert info.value.problems[0].mark.line == line_of(profiled[0], "profiles:")


def test_unknown_profile_without_profiles(write):
    doc = load_with_includes(write("main.yaml", "stages: {a: {kind: python}}\n"))
    with pytest.raises(SpecError, match="unknown profile 'fast'; this spec defines: none"):
        apply_profile(doc, "fast")


@pytest.mark.parametrize("nested", ["profiles", "include"])
def test_profile_cannot_nest_profiles_or_include(write, nested):
    path = write("main.yaml", f"stages: {{}}\nprofiles:\n  p:\n    seed: 1\n    {nested}: x.yaml\n")
    doc = load_with_includes(path)
    with pytest.raises(SpecError, match=f"a profile cannot contain `{nested}:`") as info:
        apply_profile(doc, "p")
    assert info.value.problems[0].mark.line == 5


def test_profile_must_be_a_mapping(write):
    doc = load_with_includes(write("main.yaml", "stages: {}\nprofiles:\n  p: [1, 2]\n"))
    with pytest.raises(SpecError, match="a profile must be a mapping") as info:
        apply_profile(doc, "p")
    assert info.value.problems[0].mark.line == 3


def test_profiles_can_come_from_a_fragment(write):
    write("frag.yaml", "profiles:\n  fast: {seed: 9}\n")
    main = write("main.yaml", "include: frag.yaml\nseed: 1\nstages: {a: {kind: python}}\n")
    assert apply_profile(load_with_includes(main), "fast").data["seed"] == 9


# --- what an include may show ------------------------------------------------------------------

CANARY = "sk-canary-5d1e0c"


@pytest.fixture
def project(tmp_path):
    """A project directory for the spec; files beside it (tmp_path) lie outside the project."""
    path = tmp_path / "project"
    path.mkdir()
    return path


def include_error(spec) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_with_includes(spec)
    return info.value


def test_including_proc_environ_shows_no_environment(project, monkeypatch):
    monkeypatch.setenv("HARNESS_TEST_KEY", CANARY)
    spec = project / "main.yaml"
    spec.write_text("stages: {a: {kind: python}}\ninclude: /proc/self/environ\n")
    error = include_error(spec)
    assert CANARY not in str(error) and "HARNESS_TEST_KEY" not in str(error)
    assert "include '/proc/self/environ'" in str(error) and "not a regular file" in str(error)
    assert error.problems[0].mark.line == 2 and "> 2 | include: /proc/self/environ" in str(error)


@pytest.mark.parametrize(
    "text",
    [
        f"root:x:0:0:{CANARY}:/root:/bin/bash\n",  # a scalar, like /etc/passwd
        f"- {CANARY}\n",
        f"key: [{CANARY}\n",  # invalid YAML
        f"a: 1\n{CANARY}: {CANARY}\n{CANARY}: 2\n",  # a mapping, with an error of its own
        f"api_key: {CANARY}\n",  # a mapping that merges: errors later point into it
    ],
    ids=["scalar", "list", "invalid", "mapping-duplicate", "mapping"],
)
def test_a_file_outside_the_project_is_never_quoted(project, tmp_path, text):
    (tmp_path / "secret.txt").write_text(text)
    spec = project / "main.yaml"
    spec.write_text("stages: {a: {kind: python}}\ninclude: ../secret.txt\n")
    try:
        doc = load_with_includes(spec)
    except SpecError as exc:
        error = exc
    else:  # it merged: the schema's complaint about `api_key` points into the file
        error = SpecError(check(doc.data, EXPERIMENT_SCHEMA, doc))
        assert error.problems[0].mark.file == tmp_path / "secret.txt"
    assert CANARY not in str(error)


@pytest.mark.parametrize("text", ["just text\n", "- a\n", "key: [a\n"], ids=["scalar", "list", "invalid"])
def test_a_fragment_that_is_not_a_mapping_is_refused_at_the_include_line_unquoted(project, text):
    (project / "notes.txt").write_text(text)
    spec = project / "main.yaml"
    spec.write_text("stages: {a: {kind: python}}\ninclude: notes.txt\n")
    error = include_error(spec)
    assert text.strip() not in str(error).replace("include: notes.txt", "")
    if "invalid" not in str(error):
        assert "included file notes.txt is not a spec fragment" in str(error)
        assert error.problems[0].mark == Mark(spec, 2, 1)


def test_a_fragment_of_the_project_is_quoted(project):
    frag = project / "frag.yaml"
    frag.write_text("seed: 1\nseed: 2\n")
    spec = project / "main.yaml"
    spec.write_text("include: frag.yaml\nstages: {a: {kind: python}}\n")
    error = include_error(spec)
    assert error.problems[0].mark == Mark(frag, 2, 1) and "> 2 | seed: 2" in str(error)


@pytest.mark.parametrize("target", ["fifo", "/dev/null", "/dev/zero", "directory"])
def test_an_include_that_is_not_a_regular_file_is_refused_without_reading_it(project, target, within_seconds):
    if target == "fifo":
        os.mkfifo(project / "pipe.yaml")
        target = "pipe.yaml"
    elif target == "directory":
        (project / "sub").mkdir()
        target = "sub"
    spec = project / "main.yaml"
    spec.write_text(f"stages: {{a: {{kind: python}}}}\ninclude: {target}\n")
    with within_seconds(5):
        error = include_error(spec)
    assert "not a regular file" in str(error) and error.problems[0].mark.line == 2
