"""Store hygiene: what killed runs leave is removed by a later run of the key or by
`pytest --harness-clean`, never what a running stage uses or a resume still needs."""

from __future__ import annotations

import pytest
from filelock import FileLock

from harness.core.store import LATEST, StageStore
from harness.core.store_clean import clean_store

DONE, UNFINISHED, RUNNING = "a" * 16, "b" * 16, "c" * 16


@pytest.fixture
def store(tmp_path):
    store = StageStore(tmp_path / "runs", "exp", "default", "train")
    store.dir.mkdir(parents=True)
    return store


def committed(store, key):
    tmp = store.begin(key)
    (tmp / "artifact.txt").write_text("content")
    return store.commit(tmp, key, {"stage": "train"}, {"acc": 1.0})


def leftovers(store, key):
    """What kills at each point of a run of `key` can leave behind."""
    paths = [
        store.dir / f".tmp-{key}-999-abcdef",
        store.dir / f".old-{key}-123456",
        store.scratch_dir(key),
        store.dir / f".failed-{key}",
    ]
    for path in paths:
        path.mkdir()
        (path / "partial.bin").write_text("x")
    return paths


def names(store):
    return sorted(path.name for path in store.dir.iterdir() if not path.name.endswith(".lock"))


def test_a_successful_run_removes_what_earlier_attempts_of_its_key_left(store):
    leftovers(store, DONE)
    others = leftovers(store, UNFINISHED)
    committed(store, DONE)
    assert names(store) == sorted([DONE, LATEST] + [path.name for path in others])


def test_clean_removes_leftovers_and_keeps_resume_state_of_unfinished_keys(store, tmp_path):
    committed(store, DONE)
    done = leftovers(store, DONE)  # killed while a forced rerun of a complete key committed
    tmp, old, scratch, failed = leftovers(store, UNFINISHED)
    cleaning = clean_store(tmp_path / "runs")
    assert sorted(cleaning.removed) == sorted(done + [tmp, old])
    assert sorted(cleaning.kept) == sorted([scratch, failed])
    assert names(store) == sorted([DONE, LATEST, scratch.name, failed.name])
    assert (scratch / "partial.bin").read_text() == "x"  # a resume still finds its documents


def test_clean_leaves_a_key_whose_stage_is_running(store, tmp_path):
    running = leftovers(store, RUNNING)
    with FileLock(store.lock_file(RUNNING)):  # another process running the key holds this
        cleaning = clean_store(tmp_path / "runs")
    assert cleaning.removed == [] and sorted(cleaning.busy) == sorted(running)
    assert all(path.is_dir() for path in running)


def test_clean_removes_a_dangling_latest_only(store, tmp_path):
    committed(store, DONE)
    other = StageStore(tmp_path / "runs", "exp", "default", "probe")
    other.dir.mkdir()
    (other.dir / LATEST).write_text(UNFINISHED)  # its key directory deleted by hand
    cleaning = clean_store(tmp_path / "runs")
    assert cleaning.removed == [other.dir / LATEST]
    assert (store.dir / LATEST).read_text() == DONE


def test_clean_ignores_reports_and_a_missing_runs_dir(tmp_path):
    profile = tmp_path / "runs" / "exp" / "default"
    profile.mkdir(parents=True)
    (profile / "report.md").write_text("# report")
    assert clean_store(tmp_path / "runs").removed == []
    assert clean_store(tmp_path / "nowhere").removed == []


def test_harness_clean_option_cleans_and_runs_nothing(pytester, store, tmp_path):
    tmp, old, scratch, failed = leftovers(store, UNFINISHED)
    pytester.makepyfile("def test_never(): raise AssertionError('ran')")
    result = pytester.runpytest("--harness-clean", "--runs-dir", str(tmp_path / "runs"))
    assert result.ret == 0
    result.stdout.fnmatch_lines(
        [
            "*harness clean:*",
            "removed 2 leftovers of killed runs",
            f"  exp/default/train/{old.name}",
            f"  exp/default/train/{tmp.name}",
            "kept 2 resume scratch / failed attempts*",
        ]
    )
    result.stdout.no_fnmatch_line("*AssertionError*")
    assert not tmp.exists() and not old.exists() and scratch.exists() and failed.exists()
