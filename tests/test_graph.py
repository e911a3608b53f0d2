"""harness.core.graph: stage order, dependency errors, cache keys."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.core.graph import StageGraph, canonical_json, stage_key, without
from harness.spec.errors import SpecError


def graph(**needs: list[str] | dict[str, str]) -> StageGraph:
    """StageGraph from `stage=[upstreams]` or `stage={role: upstream}`, in keyword order."""
    edges = {name: ({u: u for u in ups} if isinstance(ups, list) else ups) for name, ups in needs.items()}
    return StageGraph(edges, lambda stage, role: None)


def test_independent_stages_keep_written_order():
    assert graph(c=[], a=[], b=[]).order == ["c", "a", "b"]


def test_order_is_topological_and_ties_keep_written_order():
    g = graph(report=["probe", "data"], probe={"src": "data"}, extra=[], data=[], late=["data"])
    assert g.order == ["extra", "data", "probe", "report", "late"]


def test_diamond():
    g = graph(d=["b", "c"], c=["a"], b=["a"], a=[])
    assert g.order == ["a", "c", "b", "d"]


def test_unknown_need_suggests_a_name():
    with pytest.raises(SpecError, match=r"unknown stage 'tran' in needs; did you mean 'train'\?") as info:
        graph(train=[], evaluate=["tran"])
    assert info.value.problems[0].where == "stages.evaluate.needs"


def test_unknown_need_without_a_close_match_lists_stages():
    with pytest.raises(SpecError, match="unknown stage 'zzz' in needs; stages are: a, b"):
        graph(a=[], b={"x": "zzz"})


def test_every_bad_edge_is_reported():
    with pytest.raises(SpecError) as info:
        graph(a=["a"], b=["nope"], c=["a"])
    assert [p.message.split(";")[0] for p in info.value.problems] == [
        "stage 'a' needs itself",
        "unknown stage 'nope' in needs",
    ]


def test_self_dependency():
    with pytest.raises(SpecError, match="stage 'a' needs itself"):
        graph(a={"me": "a"})


@pytest.mark.parametrize(
    ("needs", "cycle"),
    [
        ({"a": ["b"], "b": ["a"]}, "a -> b -> a"),
        ({"x": [], "a": ["c"], "b": ["a"], "c": ["b"]}, "a -> c -> b -> a"),
        ({"x": [], "a": ["b", "x"], "b": ["c"], "c": ["b"]}, "b -> c -> b"),
    ],
)
def test_cycle_shows_the_cycle(needs, cycle):
    calls = []

    def mark(stage, role):
        calls.append((stage, role))

    edges = {n: {u: u for u in ups} for n, ups in needs.items()}
    with pytest.raises(SpecError) as info:
        StageGraph(edges, mark)
    assert str(info.value) == f"stages.{cycle[0]}.needs: cycle in needs: {cycle}"
    first, second = cycle.split(" -> ")[:2]
    assert calls == [(first, second)]  # the error points at the edge that starts the cycle


# --- stage keys ------------------------------------------------------------------------------------

MATERIAL = dict(
    kind="python",
    code_version="src-abc",
    params={"function": "m:f", "args": {"n": 1, "dim": 2}},
    seed=0,
    upstream={"data": {"key": "k1", "digest": "d1"}},
    inputs={"inputs.x": "sha-x"},
)


def test_stage_key_is_a_short_stable_hex_digest():
    key = stage_key(**MATERIAL)
    assert len(key) == 16 and int(key, 16) >= 0
    assert stage_key(**MATERIAL) == key


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kind", "other"),
        ("code_version", "src-abd"),
        ("params", {"function": "m:f", "args": {"n": 2, "dim": 2}}),
        ("params", {"function": "m:f", "args": {"n": 1, "dim": 2, "extra": None}}),
        ("params", {"function": "m:f", "args": {"n": 1.0, "dim": 2}}),
        ("seed", 1),
        ("upstream", {"data": {"key": "k1", "digest": "d2"}}),
        ("upstream", {"data": {"key": "k2", "digest": "d1"}}),
        ("upstream", {"other": {"key": "k1", "digest": "d1"}}),
        ("upstream", {}),
        ("inputs", {"inputs.x": "sha-y"}),
        ("inputs", {"inputs.y": "sha-x"}),
        ("fingerprint", "fixture:tiny-world@abc"),
    ],
)
def test_stage_key_changes_with_every_field(field, value):
    assert stage_key(**{**MATERIAL, field: value}) != stage_key(**MATERIAL)


def test_stage_key_ignores_dict_key_order():
    reordered = dict(
        inputs=dict(reversed(MATERIAL["inputs"].items())),
        upstream={"data": {"digest": "d1", "key": "k1"}},
        params={"args": {"dim": 2, "n": 1}, "function": "m:f"},
        seed=0,
        code_version="src-abc",
        kind="python",
    )
    assert stage_key(**reordered) == stage_key(**MATERIAL)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=6), st.randoms(use_true_random=False))
def test_stage_key_is_independent_of_params_insertion_order(params, random):
    def shuffled(value):
        if isinstance(value, dict):
            items = list(value.items())
            random.shuffle(items)
            return {k: shuffled(v) for k, v in items}
        return [shuffled(v) for v in value] if isinstance(value, list) else value

    assert stage_key(**{**MATERIAL, "params": shuffled(params)}) == stage_key(
        **{**MATERIAL, "params": params}
    )
    assert canonical_json(shuffled(params)) == canonical_json(params)


def test_without_drops_dotted_transport_params():
    params = {"batch_size": 8, "client": {"concurrency": 4, "timeout": 30, "model": "m"}, "lr": 0.1}
    out = without(params, ("batch_size", "client.concurrency", "client.timeout", "missing.deep.path", "lr.x"))
    assert out == {"client": {"model": "m"}, "lr": 0.1}
    assert params["client"] == {"concurrency": 4, "timeout": 30, "model": "m"}  # input untouched


def test_transport_params_do_not_change_the_key():
    transport = ("client.concurrency",)
    fast = {**MATERIAL["params"], "client": {"concurrency": 64}}
    slow = {**MATERIAL["params"], "client": {"concurrency": 1}}
    assert stage_key(**{**MATERIAL, "params": without(fast, transport)}) == stage_key(
        **{**MATERIAL, "params": without(slow, transport)}
    )
    assert without(fast, ()) != without(slow, ())
