"""Hostile specs at collection: whatever a spec file holds (alias bombs, tags, huge numbers,
odd Unicode, device paths, deep nesting), loading it gives an Experiment or a clean
SpecError, quickly and in little memory, never another exception or a hang."""

from __future__ import annotations

import json
import os
import re
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from harness.core.experiment import Experiment, load_experiment
from harness.spec.errors import SpecError

# separates bounded work (~0.1 s) from the exponential kind (a 7-level bomb: 24 s) on a loaded CI machine
SECONDS = 5.0
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
PEAK_BYTES = 64 * 2**20

TEMPLATE = """\
experiment: hostile
{top}
stages:
  {stage}:
    kind: python
    params:
      function: mysteps:f
      metrics: [m]
      args:
        x: {value}
{args}
    gates: [{gate}]
profiles:
  tiny: {{stages: {{{stage}: {{params: {{args: {{x: {value}}}}}}}}}}}
"""
SAFE = {"top": "", "stage": "a", "value": "1", "args": "", "gate": "m > 0"}

DEVICES = [
    "/dev/zero",
    "/dev/null",
    "/dev/urandom",
    "/dev/stdin",
    "/proc/self/environ",
    "/proc/self/mem",
    "/proc/self/fd/0",
    "/sys/kernel/mm/transparent_hugepage/enabled",
    "/",
    ".",
    "..",
    "pipe.yaml",  # a fifo beside the spec
]
TAGS = [
    "!!python/object/apply:os.system ['true']",
    "!!python/name:os.system",
    "!!python/object:collections.OrderedDict {}",
    "!!binary aGVsbG8=",
    "!!set {a, b}",
    "!!omap [a: 1, b: 2]",
    "!!pairs [a: 1]",
    "!!timestamp 2024-01-01",
    "!!float nan",
    "!!int 99999999999999999999",
    "!!str [a]",
    "!custom x",
    "!<tag:example.com,2000:x> y",
]


def bomb(levels: int, width: int, style: str) -> str:
    """Lines under `args:`, each anchor repeating the one before `width` times."""
    indent = " " * 8
    lines = [f"{indent}l0: &l0 {{k: [lol, lol]}}"]
    for i in range(1, levels + 1):
        refs = ", ".join([f"*l{i - 1}"] * width)
        if style == "list":
            lines.append(f"{indent}l{i}: &l{i} [{refs}]")
        elif style == "map":
            keys = ", ".join(f"k{j}: *l{i - 1}" for j in range(width))
            lines.append(f"{indent}l{i}: &l{i} {{{keys}}}")
        else:  # merge keys, each merged mapping walked again
            lines.append(f"{indent}l{i}: &l{i} {{<<: [{refs}], n{i}: {i}}}")
    return "\n".join(lines)


def quoted(text: str) -> str:
    """`text` as a YAML double-quoted scalar: JSON's escapes are YAML's (lone surrogates too)."""
    return json.dumps(text)


odd_text = st.text(
    alphabet=st.one_of(
        st.characters(codec=None, exclude_categories=()),  # any code point, surrogates included
        st.sampled_from(["\x00", "\u202e", "\u200f", "\ufeff", "\n", "\r", "\u2028", "\t", "\\", '"', "'"]),
        st.sampled_from("٠١٢٣٤٥٦٧٨٩０１２.e-"),
    ),
    max_size=30,
)

huge_numbers = st.one_of(
    st.integers(min_value=1, max_value=5000).map(lambda n: "9" * n),
    st.integers(min_value=1, max_value=5000).map(lambda n: "-0x" + "f" * n),
    st.sampled_from([".nan", ".NaN", "-.inf", ".inf", "1.0e+400", "-1.0e+400", "1e400", "0o" + "7" * 30]),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)


@st.composite
def hostile_specs(draw) -> tuple[str, dict[str, str]]:
    """A valid spec's slots, one replaced by something hostile; returns (kind, slots)."""
    kind = draw(st.sampled_from(["bomb", "tag", "number", "text", "raw-text", "device", "nesting"]))
    slots = dict(SAFE)
    if kind == "bomb":
        levels = draw(st.integers(min_value=1, max_value=12))
        width = draw(st.integers(min_value=2, max_value=10))
        slots["args"] = bomb(levels, width, draw(st.sampled_from(["list", "map", "merge"])))
        return kind, slots
    slot = draw(st.sampled_from(["value", "stage", "gate", "top"]))
    if kind == "tag":
        value = draw(st.sampled_from(TAGS))
    elif kind == "number":
        value = draw(huge_numbers)
    elif kind == "text":
        value = quoted(draw(odd_text))
    elif kind == "raw-text":
        value = draw(odd_text)
    elif kind == "device":
        where = draw(st.sampled_from(["include", "input"]))
        path = draw(st.sampled_from(DEVICES))
        if where == "include":
            slots["top"] = f"include: {quoted(path)}"
        else:
            slots["args"] = f"      inputs: {{x: {quoted(path)}}}"
        return kind, slots
    else:
        depth = draw(st.integers(min_value=1, max_value=3000))
        value = draw(st.sampled_from(["[" * depth + "]" * depth, "{a: " * depth + "1" + "}" * depth]))
    slots[slot] = f"description: {value}" if slot == "top" else value
    return kind, slots


@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hostile")
    (directory / "mysteps.py").write_text("def f(ctx):\n    return {'m': 1}\n")
    os.mkfifo(directory / "pipe.yaml")
    return directory


def collect(path: Path) -> Experiment | SpecError:
    try:
        return load_experiment(path)
    except SpecError as exc:
        return exc


def assert_collects_cleanly(spec_dir: Path, text: str) -> None:
    path = spec_dir / "spec.yaml"
    path.write_bytes(text.encode("utf-8", errors="surrogatepass"))
    started = time.perf_counter()
    outcome = collect(path)
    elapsed = time.perf_counter() - started
    assert elapsed < SECONDS, f"collection took {elapsed:.2f} s"
    if isinstance(outcome, SpecError):
        message = str(outcome)
        assert message and "Traceback" not in message and len(message) < 20_000
    else:  # what collection accepts, a run can hash and write: JSON params, plain directory names
        for name in [outcome.name, *outcome.stages]:
            assert NAME.fullmatch(name), name
        for stage in outcome.stages.values():
            json.dumps(stage.params, allow_nan=False).encode("utf-8")
    tracemalloc.start()
    try:
        collect(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES, f"collection peaked at {peak / 2**20:.0f} MiB"


def test_the_template_itself_collects(spec_dir):
    path = spec_dir / "safe.yaml"
    path.write_text(TEMPLATE.format(**SAFE))
    experiment = load_experiment(path, "tiny")
    assert experiment.name == "hostile" and experiment.stages["a"].params["args"] == {"x": 1}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hostile_specs())
@example(("bomb", {**SAFE, "args": bomb(9, 10, "list")}))  # the billion laughs
@example(("bomb", {**SAFE, "args": bomb(12, 10, "merge")}))
@example(("device", {**SAFE, "top": 'include: "/dev/zero"'}))
@example(("device", {**SAFE, "top": 'include: "pipe.yaml"'}))
@example(("number", {**SAFE, "value": "9" * 5000}))
@example(("text", {**SAFE, "stage": quoted("a\n")}))
@example(("text", {**SAFE, "value": quoted("\ud800")}))
@example(("text", {**SAFE, "gate": quoted("m > \u0660.\u0665")}))
def test_hostile_specs_collect_cleanly_in_bounded_time_and_memory(spec_dir, case):
    _, slots = case
    assert_collects_cleanly(spec_dir, TEMPLATE.format(**slots))
