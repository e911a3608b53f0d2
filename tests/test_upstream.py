"""Finding an upstream by role, and the adapter a training stage saved."""

from __future__ import annotations

import pytest

from harness.core.stage import Role, StageError, Upstream
from harness.core.upstream import adapter_dir, find_upstream, named_adapter_roles, unfilled


def test_adapter_comes_from_the_adapter_role_or_the_only_upstream(tmp_path):
    (tmp_path / "t" / "adapter").mkdir(parents=True)
    (tmp_path / "t" / "adapter" / "adapter_config.json").write_text("{}")
    good, other = Upstream("train", "python", tmp_path / "t", {}), Upstream("x", "python", tmp_path, {})
    assert adapter_dir({"train": good}, "k") == tmp_path / "t" / "adapter"
    assert adapter_dir({"adapter": good, "docs": other}, "k") == tmp_path / "t" / "adapter"
    with pytest.raises(StageError, match="needs: {adapter: STAGE}"):
        adapter_dir({}, "k")
    with pytest.raises(StageError, match="several upstream stages"):
        adapter_dir({"a": good, "b": other}, "k")
    with pytest.raises(StageError, match="no peft adapter at"):
        adapter_dir({"adapter": other}, "k")


def test_a_role_names_its_stage_among_several(tmp_path):
    probe, train = Upstream("p", "train_probe", tmp_path, {}), Upstream("t", "finetune_lora", tmp_path, {})
    assert find_upstream({"probe": probe, "adapter": train}, "probe", "steer") is probe
    with pytest.raises(StageError, match="steer has several upstream stages .*role `probe`"):
        find_upstream({"a": probe, "b": train}, "probe", "steer")
    # a kind that needs two stages never takes the one it has for the other
    with pytest.raises(StageError, match="needs the stage that provides its adapter"):
        find_upstream({"probe": probe}, "adapter", "steer", only=False)


def test_unfilled_roles_follow_the_rule_find_upstream_applies():
    data, base = Role("docs", "docs.jsonl", only=True), Role("base_adapter", "adapter/", optional=True)
    probe = Role("probe", "best_layer")
    assert unfilled([data, base], {"docs"}) == []
    assert unfilled([data, base], {"gen"}) == []  # the only upstream outside the other roles
    assert unfilled([data, base], {"gen", "base_adapter"}) == []
    assert unfilled([data, base], {"a", "b"}) == [data]  # several: none is taken for `docs`
    assert unfilled([data, base], set()) == [data]  # an optional role may be left out
    assert unfilled([probe], {"p"}) == [probe]  # a role without `only` is filled by its name alone


def test_settings_name_adapter_roles_where_each_is_first_written():
    roles = named_adapter_roles({"settings": {"base": [], "p": ["p"], "pe": [["p", "e"], ["p", "e2"]]}})
    assert [(r.name, r.named_at, r.only) for r in roles] == [
        ("p", ("settings", "p", 0), False),
        ("e", ("settings", "pe", 0, 1), False),
        ("e2", ("settings", "pe", 1, 1), False),
    ]
