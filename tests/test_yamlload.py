"""harness.spec.yamlload: safe YAML with 1-based marks; every YAML problem is a SpecError."""

from __future__ import annotations

import os
import time
import tracemalloc
from pathlib import Path

import pytest

from harness.spec.errors import Mark, SpecError, allow_quoting
from harness.spec.yamlload import MAX_DEPTH, MAX_SPEC_BYTES, MAX_VALUES, load_yaml


@pytest.fixture
def write(tmp_path):
    def write(text: str, name: str = "spec.yaml"):
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        allow_quoting(path)  # as the spec a user passes: its lines are shown in errors
        return path

    return write


def spec_error(path) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_yaml(path)
    # No chained exception: the user sees the message alone, no "During handling of ..." traceback.
    error = info.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    assert str(info.value) and "Traceback" not in str(info.value)
    return info.value


def caret_column(message: str) -> int:
    """1-based column of the caret in a rendered snippet."""
    caret_line = next(line for line in message.splitlines() if line.rstrip().endswith("^"))
    gutter = caret_line.index("|") + 2
    return caret_line.index("^") - gutter + 1


def test_marks_are_one_based_lines_and_columns_of_keys_and_items(write):
    path = write("experiment: x\nstages:\n  train:\n    gates:\n      - acc > 0.5\n      - loss < 1\n")
    doc = load_yaml(path)
    assert doc.data == {"experiment": "x", "stages": {"train": {"gates": ["acc > 0.5", "loss < 1"]}}}
    expected = {
        (): (1, 1),
        ("experiment",): (1, 1),
        ("stages",): (2, 1),
        ("stages", "train"): (3, 3),
        ("stages", "train", "gates"): (4, 5),
        ("stages", "train", "gates", 0): (5, 9),
        ("stages", "train", "gates", 1): (6, 9),
    }
    assert {p: (m.line, m.column) for p, m in doc.marks.items()} == expected
    assert all(m.file == path for m in doc.marks.values())


def test_flow_style_marks_point_inside_the_line(write):
    doc = load_yaml(write("args: {n: 1, dim: 64}\nmetrics: [a, b]\n"))
    assert doc.mark(("args", "dim")) == Mark(doc.mark(()).file, 1, 14)
    assert (doc.mark(("metrics", 1)).line, doc.mark(("metrics", 1)).column) == (2, 14)


def test_mark_falls_back_to_the_closest_ancestor(write):
    doc = load_yaml(write("a:\n  b: 1\n"))
    assert doc.mark(("a", "b", "c", 0)) == doc.marks[("a", "b")]
    assert doc.mark(("nope",)) == doc.marks[()]


def test_duplicate_key_names_both_lines(write):
    path = write("stages:\n  a:\n    kind: python\n  b:\n    kind: python\n  a:\n    kind: x\n")
    error = spec_error(path)
    assert "duplicate key 'a'" in str(error)
    assert "line 2" in str(error)  # the first definition
    assert error.problems[0].mark == Mark(path, 6, 3)  # the second one
    assert "> 6 |   a:" in str(error)


def test_same_key_in_different_mappings_is_not_a_duplicate(write):
    assert load_yaml(write("a: {x: 1}\nb: {x: 2}\n")).data == {"a": {"x": 1}, "b": {"x": 2}}


@pytest.mark.parametrize("text", ['a: 1\n"a": 2\n', "a: 1\n'a': 2\n", 'a: 1\n"\\x61": 2\n'])
def test_keys_that_load_as_the_same_string_are_duplicates(write, text):
    error = spec_error(write(text))
    assert "duplicate key 'a'" in str(error) and "(first defined at line 1)" in str(error)
    assert error.problems[0].mark.line == 2


@pytest.mark.parametrize(
    ("key", "kind"),
    [("1", "int"), ("0x1", "int"), ("true", "bool"), ("on", "bool"), ("~", "NoneType"), ("1.5", "float")],
)
def test_keys_must_be_strings(write, key, kind):
    """JSON has string keys only: `{1: a, b: c}` in a python stage's args failed at run."""
    error = spec_error(write(f"args:\n  b: c\n  {key}: a\n"))
    assert f"mapping keys must be strings: `{key}` is read as a {kind}; quote it" in str(error)
    assert (error.problems[0].mark.line, error.problems[0].mark.column) == (3, 3)


def test_quoted_keys_are_strings(write):
    assert load_yaml(write('"1": a\n"on": b\n')).data == {"1": "a", "on": "b"}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (".nan", "`.nan` is not a finite number"),
        ("-.inf", "`-.inf` is not a finite number"),
        ("1.0e+400", "`1.0e+400` is not a finite number"),
        ("!!float nan", "`nan` is not a finite number"),
        ("9223372036854775808", "`9223372036854775808` is beyond a 64-bit integer"),
        ("-9223372036854775809", "`-9223372036854775809` is beyond a 64-bit integer"),
        ("2024-01-01", "`2024-01-01` is read as a date, which is not JSON data; quote it to keep it as text"),
        ("2024-01-01 10:00:00", "is read as a datetime"),
        ("!!binary aGVsbG8=", "`aGVsbG8=` is read as a bytes"),
        ("!!set {a, b}", "`!!set` is not allowed: a spec holds plain mappings and lists"),
        ("!!omap [a: 1]", "`!!omap` is not allowed"),
        ("!!pairs [a: 1]", "`!!pairs` is not allowed"),
    ],
)
def test_values_json_cannot_hold_are_refused_where_written(write, value, message):
    """Such values passed the schema (NaN compares false with every bound) and failed at run."""
    error = spec_error(write(f"stages:\n  a:\n    params: {{lr: 1, x: {value}}}\n"))
    assert message in str(error)
    assert (error.problems[0].mark.line, error.problems[0].mark.column) == (3, 24)


@pytest.mark.usefixtures("either_loader")
def test_a_lone_surrogate_is_refused_by_either_loader(write):
    """The pure-Python loader builds "\\ud800" into a str that no file can hold; libyaml refuses it."""
    error = spec_error(write('a: 1\nb: "x\\ud800"\n'))
    assert error.problems[0].mark.line == 2


def test_json_values_at_the_edges_load(write):
    text = "a: [9223372036854775807, -9223372036854775808, 1.7976931348623157e+308, '.nan', '2024-01-01']\n"
    largest = [2**63 - 1, -(2**63), 1.7976931348623157e308]
    assert load_yaml(write(text)).data["a"] == [*largest, ".nan", "2024-01-01"]


MALFORMED = {
    "bad-indentation": ("stages:\n  a: 1\n b: 2\n", 3),
    "unclosed-bracket": ("stages: [a, b\nseed: 1\n", 2),
    "tab-indentation": ("stages:\n\ta: 1\n", 2),
    "two-documents": ("a: 1\n---\nb: 2\n", 2),
    "unknown-tag": ("a: !python/object:os.system x\n", 1),
    "non-scalar-key": ("? [1, 2]\n: 3\n", 1),
    "control-character": ("a: \x07\n", 1),
}


@pytest.mark.parametrize(("text", "line"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_yaml_points_at_the_offending_line_with_a_caret(write, text, line):
    path = write(text)
    error = spec_error(path)
    mark = error.problems[0].mark
    assert mark is not None and mark.file == path and mark.line == line
    assert f"spec.yaml:{line}:{mark.column}" in str(error)
    offending = text.splitlines()[line - 1]
    assert f"> {line} | {offending}" in str(error)
    assert caret_column(str(error)) == mark.column


@pytest.mark.parametrize("quote", ['"', "'"])
def test_unclosed_quote_points_at_the_quote(write, quote):
    text = f"stages:\n  a: {quote}oops\nseed: 1\nexperiment: x\n"
    error = spec_error(write(text))
    mark = error.problems[0].mark
    assert (mark.line, mark.column) == (2, 6), str(error)  # the opening quote
    assert f"> 2 |   a: {quote}oops" in str(error)
    assert caret_column(str(error)) == 6


def test_unclosed_quote_is_a_spec_error(write):
    error = spec_error(write('a: "oops\nb: 1\n'))
    assert "quoted scalar" in str(error) and "spec.yaml:" in str(error)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("seed: 1\ndescription: 2024-02-30\n", 2),
        ("seed: !!int seven\n", 1),
        ("seed: 1\nat: 2024-01-01 25:00:00\n", 2),
        ("stages:\n  2024-13-01: x\n", 2),  # as a key
    ],
)
def test_values_yaml_cannot_construct_are_spec_errors(write, text, line):
    error = spec_error(write(text))
    assert error.problems[0].mark.line == line
    assert f"> {line} | {text.splitlines()[line - 1]}" in str(error)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_file_is_a_document_of_none(write, text):
    path = write(text)
    doc = load_yaml(path)
    assert doc.data is None
    assert doc.mark(()) == Mark(path, 1, 1)


def test_merge_keys_and_anchors(write):
    text = (
        "defaults: &defaults\n"
        "  lr: 0.1\n"
        "  epochs: 3\n"
        "more: &more {warmup: 5, epochs: 9}\n"
        "train:\n"
        "  <<: [*defaults, *more]\n"
        "  lr: 0.5\n"
        "list: &items [a, b]\n"
        "copy: *items\n"
    )
    doc = load_yaml(write(text))
    # explicit keys beat merged ones; among merged mappings the first wins
    assert doc.data["train"] == {"lr": 0.5, "epochs": 3, "warmup": 5}
    assert doc.data["copy"] == ["a", "b"]
    assert doc.marks[("train", "lr")].line == 7  # the explicit key, not the anchor's
    assert doc.marks[("train", "epochs")].line == 3  # where the merged value was written
    assert doc.marks[("train", "warmup")].line == 4


@pytest.fixture(params=["CSafeLoader", "SafeLoader"])
def either_loader(request, monkeypatch):
    """The same rules whether PyYAML's C loader or its pure-Python one parses."""
    import yaml

    from harness.spec import yamlload

    if not hasattr(yaml, request.param):
        pytest.skip(f"this PyYAML has no {request.param}")
    monkeypatch.setattr(yamlload, "_Loader", getattr(yaml, request.param))


@pytest.mark.usefixtures("either_loader")
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # YAML 1.1: in a merge list the first mapping holding a key wins
        ("a: &a {k: 1}\nb: &b {k: 2, j: 3}\nc: {<<: [*a, *b]}\n", {"k": 1, "j": 3}),
        ("a: &a {k: 1}\nb: &b {k: 2, j: 3}\nc: {<<: [*b, *a]}\n", {"k": 2, "j": 3}),
        # explicit keys beat merged ones, before or after the merge key
        ("a: &a {k: 1}\nc: {k: 5, <<: *a}\n", {"k": 5}),
        ("a: &a {k: 1}\nc: {<<: *a, k: 5}\n", {"k": 5}),
        # a merged mapping's own merges are resolved first, by the same rules
        ("a: &a {k: 1, m: 1}\nb: &b {<<: *a, k: 2}\nc: {<<: [*b, {m: 9, n: 9}]}\n", {"k": 2, "m": 1, "n": 9}),
        # merged values are copies: the anchor's mapping is not changed by the merge
        ("a: &a {k: {x: 1}}\nc: {<<: *a, j: 0}\n", {"k": {"x": 1}, "j": 0}),
    ],
)
def test_merge_key_semantics_are_the_projects_own(write, text, expected):
    assert load_yaml(write(text)).data["c"] == expected


@pytest.mark.usefixtures("either_loader")
def test_merge_of_a_scalar_is_a_spec_error_at_its_line(write):
    error = spec_error(write("a: 1\nc:\n  <<: [{k: 1}, 7]\n"))
    assert error.problems[0].mark.line == 3
    assert "`<<` merges a mapping or a list of mappings" in str(error)


@pytest.mark.usefixtures("either_loader")
def test_deep_nesting_is_a_spec_error(write):
    assert "nesting too deep" in str(spec_error(write("a: " + "[" * 3000 + "]" * 3000 + "\n")))


def test_explicit_key_after_merge_is_not_a_duplicate(write):
    doc = load_yaml(write("base: &b {x: 1}\nd:\n  <<: *b\n  x: 2\n"))
    assert doc.data["d"] == {"x": 2}
    assert doc.marks[("d", "x")].line == 4


@pytest.mark.parametrize("text", ["a: &a [1, *a]\n", "a: &a\n  b: *a\n", "a: &a\n  <<: *a\n"])
def test_recursive_alias_is_rejected(write, text):
    error = spec_error(write(text))
    assert "recursive YAML alias" in str(error)
    assert error.problems[0].mark.line == 1


def test_missing_file(tmp_path):
    error = spec_error(tmp_path / "nope.yaml")
    assert "file not found" in str(error) and "nope.yaml" in str(error)


def test_undecodable_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"a: \xff\xfe\n")
    assert "cannot read" in str(spec_error(path))


def test_python_tags_are_not_constructed(write, tmp_path):
    marker = tmp_path / "pwned"
    error = spec_error(write(f"a: !!python/object/apply:os.system ['touch {marker}']\n"))
    assert "`!!python/object/apply:os.system` is not allowed" in str(error)
    error = spec_error(write("a: !!python/name:os.system x\n"))
    assert "could not determine a constructor" in str(error)
    assert not marker.exists()


# --- hostile input: bounded work, regular files only ----------------------------------------------


def laughs(levels: int, width: int = 10) -> str:
    """A "billion laughs": each level lists the previous level's anchor `width` times."""
    lines = ["l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("levels", [5, 9])
def test_alias_bomb_is_refused_at_an_anchor_in_bounded_time_and_memory(write, levels):
    path = write(laughs(levels))
    tracemalloc.start()
    started = time.perf_counter()
    try:
        error = spec_error(path)
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "YAML aliases expand to more than" in str(error)
    mark = error.problems[0].mark
    assert mark.file == path and mark.line in range(1, levels + 1)
    assert path.read_text().splitlines()[mark.line - 1][mark.column - 1 :].startswith("&l")  # the anchor
    # the bound separates bounded work (0.1 s, 0.4 s under tracemalloc) from the exponential
    # kind (5 levels took 23 s before the bound) on a loaded CI machine
    assert elapsed < 5.0 and peak < 50 * 2**20, (elapsed, peak)


def test_anchors_reused_within_the_bound_still_load(write):
    doc = load_yaml(write(laughs(3)))
    assert doc.data["l3"][9][9] == [["lol"] * 10] * 10
    assert doc.marks[("l3", 9, 9, 0, 0)].line == 1  # where the value was written


def test_a_plain_document_over_the_value_limit_is_refused(write):
    error = spec_error(write("a: [" + ", ".join(["0"] * (MAX_VALUES + 1)) + "]\n"))
    assert f"more than {MAX_VALUES:,} values" in str(error)


def nested(depth: int) -> str:
    """`x` inside `depth` mappings, one per line."""
    return "".join(f"{'  ' * i}k{i}:\n" for i in range(depth)) + f"{'  ' * depth}x\n"


def test_nesting_up_to_the_depth_limit_loads(write):
    deepest = tuple(f"k{i}" for i in range(MAX_DEPTH))
    assert load_yaml(write(nested(MAX_DEPTH))).marks[deepest].line == MAX_DEPTH


def test_nesting_past_the_depth_limit_is_refused_at_the_deepest_value(write):
    error = spec_error(write(nested(MAX_DEPTH + 1)))
    assert "nesting too deep" in str(error)
    assert error.problems[0].mark.line == MAX_DEPTH + 2  # the line of `x`


def test_a_spec_file_over_the_size_limit_is_refused_before_parsing(write):
    path = write("a: 1\n" + "#" * MAX_SPEC_BYTES + "\n")
    assert f"larger than the {MAX_SPEC_BYTES // 2**10} KiB a spec file may hold" in str(spec_error(path))


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_only_regular_files_are_read(tmp_path, kind, within_seconds):
    """A fifo with no writer would block `open` forever; a device like /dev/zero never ends."""
    if kind == "fifo":
        path = tmp_path / "spec.yaml"
        os.mkfifo(path)
    else:
        path = Path("/dev/null") if kind == "device" else tmp_path
    with within_seconds(5):
        error = spec_error(path)
    assert "not a regular file" in str(error)


def test_a_proc_file_whose_size_is_not_its_length_is_refused(within_seconds):
    with within_seconds(5):
        error = spec_error(Path("/proc/self/environ"))
    assert "not a regular file" in str(error)
