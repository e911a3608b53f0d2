"""Property tests: whatever is done to a valid spec, loading it gives an Experiment or a
SpecError with a readable message, never any other exception."""

from __future__ import annotations

import itertools
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.core.experiment import Experiment, load_experiment
from harness.spec.errors import SpecError

SPECS = {
    "pipeline": """\
        # yaml-language-server: $schema=../specs/experiment.schema.json
        experiment: pipeline
        description: three python stages
        seed: 3
        stages:
          data:
            kind: python
            params:
              function: mysteps:make
              args: {n: 100, dim: 8}
              inputs: {table: data.csv}
              metrics: [n_items, rate]
            gates:
              - n_items >= 10
          probe:
            kind: python
            needs: [data]
            params:
              function: mysteps:probe
              metrics: [auc, gap]
            gates:
              - ci_low(auc) > 0.7
              - gap > 0.2 (abort < 0.1)
          report:
            kind: python
            needs: {source: data, model: probe}
            params: {function: "pkg.steps:report", metrics: [done]}
            gates: ["done == 1"]
        """,
    "profiles": """\
        seed: 1
        stages:
          train:
            kind: python
            description: trains
            params:
              function: mysteps:make
              args:
                lr: 0.1
                layers: [8, 8]
                opts: {decay: 0.01}
              metrics: [loss, acc]
            gates:
              - loss < 1.5e-1 (abort >= 2)
              - ci_high(acc) <= 1
          eval:
            kind: python
            needs: [train]
            params: {function: "mysteps:probe", metrics: [acc]}
            gates: [acc != 0]
        profiles:
          tiny:
            seed: 2
            stages:
              train:
                params:
                  args: {lr: 0.5, layers: [2]}
          nogates:
            stages:
              train: {gates: []}
              eval: {gates: []}
        """,
    "anchors": """\
        experiment: anchored
        stages:
          a: &stage
            kind: python
            params: &params
              function: mysteps:make
              metrics: [m]
            gates: [m > 0]
          b:
            <<: *stage
            needs: [a]
          c:
            kind: python
            needs: {up: b}
            params:
              <<: *params
              args: {k: 1}
        """,
    "included": """\
        include: [fragment.yaml]
        seed: 5
        stages:
          b:
            kind: python
            needs: [a]
            params: {function: "mysteps:probe", metrics: [auc]}
            gates: ["auc >= 0.5"]
        profiles:
          quick:
            stages:
              a: {params: {args: {n: 1}}}
        """,
}

FILES = {
    "mysteps.py": "def make(ctx):\n    return {}\n\ndef probe(ctx):\n    return {}\n",
    "pkg/__init__.py": "",
    "pkg/steps.py": "def report(ctx):\n    return {}\n",
    "data.csv": "a,b\n1,2\n",
    "fragment.yaml": textwrap.dedent(
        """\
        stages:
          a:
            kind: python
            params:
              function: mysteps:make
              args: {n: 10}
              metrics: [m, n_items]
            gates: [m > 0]
        """
    ),
}

# fmt: off
GARBAGE = [
    ":", ": ", "- ", "-", "{", "}", "[", "]", ",", "'", '"', "#", "&a ", "*a", "*nope", "<<: *a", "? ",
    "|", ">", "!", "!!str ", "!!python/name:os.system ", "!custom ", "%YAML 1.1", "---", "...", "\t", "\\",
    "\n", "\r\n", "\x00", "\x07", "\ufeff", "\u2028", "\U0001f600", "  ", "~", "null", "true", "1e9999",
    "0x1F", "0o17", ".nan", "-.inf", "2024-01-01", "stages:", "kind: python", "needs: [a]", "include: x",
    "gates: [m >]", "profiles:", "@", "`",
]
# fmt: on

counter = itertools.count()


@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("specs")
    for name, text in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def spec_text(name: str) -> str:
    return textwrap.dedent(SPECS[name])


def check_load(spec_dir: Path, text: str, profile: str | None = None) -> Experiment | None:
    """Load `text` as a spec: it must give an Experiment or a well-formed SpecError."""
    path = spec_dir / f"spec_{next(counter)}.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        return load_experiment(path, profile)
    except SpecError as exc:
        message = str(exc)
        assert message.strip(), "empty SpecError"
        assert "Traceback" not in message
        assert exc.problems
        return None
    finally:
        path.unlink()


@pytest.mark.parametrize("name", sorted(SPECS))
def test_the_seed_specs_are_valid(spec_dir, name):
    experiment = check_load(spec_dir, spec_text(name))
    assert isinstance(experiment, Experiment) and experiment.stages
    if name in ("profiles", "included"):
        profiles = yaml.safe_load(spec_text(name))["profiles"]
        for profile in profiles:
            assert isinstance(check_load(spec_dir, spec_text(name), profile), Experiment)


# --- text mutations --------------------------------------------------------------------------------


def profile_for(draw, name: str) -> str | None:
    """Mostly no profile or one the spec defines; sometimes one it does not."""
    defined = sorted((yaml.safe_load(spec_text(name)) or {}).get("profiles", {}))
    return draw(st.sampled_from([None, None, *defined, *defined, "nope"]))


@st.composite
def mutated_text(draw):
    name = draw(st.sampled_from(sorted(SPECS)))
    text = spec_text(name)
    for _ in range(draw(st.integers(1, 3))):
        lines = text.split("\n")
        i = draw(st.integers(0, len(lines) - 1))
        action = draw(
            st.sampled_from(
                ["delete", "duplicate", "indent", "dedent", "tab", "insert", "unicode", "truncate"]
            )
        )
        if action == "delete":
            del lines[i]
        elif action == "duplicate":
            lines.insert(i, lines[i])
        elif action == "indent":
            lines[i] = " " * draw(st.integers(1, 5)) + lines[i]
        elif action == "dedent":
            indent = len(lines[i]) - len(lines[i].lstrip(" "))
            lines[i] = lines[i][min(indent, draw(st.integers(1, 4))) :]
        elif action == "tab":
            lines[i] = "\t" + lines[i].lstrip(" ")
        elif action in ("insert", "unicode"):
            junk = draw(st.sampled_from(GARBAGE) if action == "insert" else st.text(min_size=1, max_size=8))
            at = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:at] + junk + lines[i][at:]
        text = "\n".join(lines)
        if action == "truncate":
            text = text[: draw(st.integers(0, len(text)))]
    return text, profile_for(draw, name)


@settings(max_examples=300, deadline=None)
@given(case=mutated_text())
def test_text_mutations_load_or_raise_spec_error(spec_dir, case):
    check_load(spec_dir, *case)


# --- data mutations --------------------------------------------------------------------------------

texts = st.text(max_size=10)  # NULs included: pathlib raises ValueError on them
OTHER_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    texts,
    st.sampled_from(
        ["", "mysteps:nope", "nosuch:f", "x > 1", "ci_low(m) > 2", "m > 1 (abort > 2)", "a", "b"]
    ),
    st.lists(st.integers() | texts, max_size=3),
    st.dictionaries(texts, st.integers() | texts, max_size=3),
)


def paths(data, prefix=()):
    """Every path into `data` (dict keys and list indices), parents before children."""
    yield prefix
    if isinstance(data, dict):
        for key, value in data.items():
            yield from paths(value, prefix + (key,))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from paths(value, prefix + (index,))


def parent_of(data, path):
    for part in path[:-1]:
        data = data[part]
    return data


@st.composite
def mutated_data(draw):
    name = draw(st.sampled_from(sorted(SPECS)))
    data = yaml.safe_load(spec_text(name))
    for _ in range(draw(st.integers(1, 3))):
        candidates = [p for p in paths(data) if p]
        if not candidates:
            break
        path = draw(st.sampled_from(candidates))
        parent = parent_of(data, path)
        action = draw(st.sampled_from(["replace", "delete", "rename", "wrap"]))
        if action == "replace":
            parent[path[-1]] = draw(OTHER_VALUES)
        elif action == "delete":
            del parent[path[-1]]
        elif action == "wrap":
            parent[path[-1]] = [parent[path[-1]]]
        elif isinstance(parent, dict):
            parent[draw(texts | st.sampled_from(["stages", "kind", "params", "needs"]))] = parent.pop(
                path[-1]
            )
    text = yaml.safe_dump(data, sort_keys=draw(st.booleans()), allow_unicode=draw(st.booleans()))
    return text, profile_for(draw, name)


@settings(max_examples=300, deadline=None)
@given(case=mutated_data())
def test_data_mutations_load_or_raise_spec_error(spec_dir, case):
    check_load(spec_dir, *case)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=200))
def test_arbitrary_text_loads_or_raises_spec_error(spec_dir, text):
    check_load(spec_dir, text)


@pytest.mark.parametrize("sort_keys", [False, True])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_valid_specs_survive_a_yaml_round_trip(spec_dir, name, sort_keys):
    """Dumping the parsed spec back (anchors expanded, any key order) means the same experiment."""
    original = check_load(spec_dir, spec_text(name))
    again = check_load(spec_dir, yaml.safe_dump(yaml.safe_load(spec_text(name)), sort_keys=sort_keys))
    assert again is not None
    assert list(again.stages) == list(original.stages)
    for stage, spec in original.stages.items():
        assert (again.stages[stage].params, again.stages[stage].needs) == (spec.params, spec.needs)
        assert [g.text for g in again.stages[stage].gates] == [g.text for g in spec.gates]
