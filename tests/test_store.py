"""harness.core.store: complete-or-absent key directories, LATEST, stale attempts, locking, digests."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

import harness.core.store as store_module
from harness.core.store import LATEST, MANIFEST, METRICS, StageStore, output_digest

KEY = "0123456789abcdef"


@pytest.fixture
def store(tmp_path):
    return StageStore(tmp_path / "runs", "exp", "default", "train")


def committed(store: StageStore, key: str = KEY, artifact: str = "weights", metrics=None):
    tmp = store.begin(key)
    (tmp / "artifact.txt").write_text(artifact)
    return store.commit(tmp, key, {"finished_at": "now"}, metrics or {"acc": 0.9})


def test_layout(store, tmp_path):
    assert store.dir == tmp_path / "runs" / "exp" / "default" / "train"
    assert store.key_dir(KEY) == store.dir / KEY


def test_commit_then_lookup(store):
    record = committed(store)
    found = store.lookup(KEY)
    assert found is not None
    assert found.dir == store.key_dir(KEY) == record.dir
    assert found.metrics == {"acc": 0.9}
    assert found.manifest["key"] == KEY and found.manifest["complete"] is True
    assert found.manifest["finished_at"] == "now"
    assert found.digest == record.digest == output_digest(found.dir)
    assert (found.dir / "artifact.txt").read_text() == "weights"
    assert [p.name for p in store.dir.glob(".tmp-*")] == []


def test_lookup_of_an_unknown_key(store):
    assert store.lookup(KEY) is None
    assert store.latest() is None


def damage_manifest(store, how):
    directory = store.key_dir(KEY)
    manifest = json.loads((directory / MANIFEST).read_text())
    if how == "missing":
        (directory / MANIFEST).unlink()
    elif how == "broken-json":
        (directory / MANIFEST).write_text('{"complete": true, "key": ')
    elif how == "not-an-object":
        (directory / MANIFEST).write_text("[1, 2]")
    elif how == "no-complete":
        del manifest["complete"]
        (directory / MANIFEST).write_text(json.dumps(manifest))
    elif how == "complete-false":
        (directory / MANIFEST).write_text(json.dumps({**manifest, "complete": False}))
    elif how == "other-key":
        (directory / MANIFEST).write_text(json.dumps({**manifest, "key": "fedcba9876543210"}))
    elif how == "no-digest":
        del manifest["output_digest"]
        (directory / MANIFEST).write_text(json.dumps(manifest))
    elif how == "broken-metrics":
        (directory / METRICS).write_text("{")
    elif how == "missing-metrics":
        (directory / METRICS).unlink()


@pytest.mark.parametrize(
    "how",
    [
        "missing",
        "broken-json",
        "not-an-object",
        "no-complete",
        "complete-false",
        "other-key",
        "no-digest",
        "broken-metrics",
        "missing-metrics",
    ],
)
def test_lookup_ignores_incomplete_or_damaged_directories(store, how):
    committed(store)
    assert store.lookup(KEY) is not None
    damage_manifest(store, how)
    assert store.lookup(KEY) is None
    assert store.latest() is None


def test_lookup_ignores_a_bare_key_directory(store):
    store.key_dir(KEY).mkdir(parents=True)
    (store.key_dir(KEY) / "artifact.txt").write_text("half")
    assert store.lookup(KEY) is None


def test_commit_renames_a_complete_directory_into_place(store, monkeypatch):
    """The key directory appears in one rename, of a directory that already holds
    metrics.json and a complete manifest."""
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        if os.fspath(dst) == os.fspath(store.key_dir(KEY)):
            manifest = json.loads((Path(src) / MANIFEST).read_text())
            metrics = json.loads((Path(src) / METRICS).read_text())
            seen.append((store.key_dir(KEY).exists(), manifest["complete"], manifest["key"], metrics))
        return real_replace(src, dst)

    monkeypatch.setattr(store_module.os, "replace", spy)
    committed(store)
    assert seen == [(False, True, KEY, {"acc": 0.9})]


def test_commit_over_an_existing_directory_replaces_it(store):
    committed(store, artifact="old")
    (store.key_dir(KEY) / "stale.txt").write_text("from a damaged run")
    record = committed(store, artifact="new", metrics={"acc": 0.1})
    assert (record.dir / "artifact.txt").read_text() == "new"
    assert not (record.dir / "stale.txt").exists()
    assert store.lookup(KEY).metrics == {"acc": 0.1}
    assert [p.name for p in store.dir.iterdir() if p.name.startswith(".old-")] == []


def test_commit_updates_latest(store):
    committed(store, "a" * 16, metrics={"acc": 0.1})
    assert (store.dir / LATEST).read_text() == "a" * 16
    assert store.latest()["key"] == "a" * 16
    committed(store, "b" * 16, metrics={"acc": 0.2})
    assert (store.dir / LATEST).read_text() == "b" * 16
    assert store.latest()["key"] == "b" * 16
    assert store.lookup("a" * 16) is not None  # older runs stay


def test_latest_ignores_a_latest_pointing_nowhere(store):
    committed(store)
    (store.dir / LATEST).write_text("ffffffffffffffff")
    assert store.latest() is None


def test_commit_removes_the_scratch_dir(store):
    store.scratch_dir(KEY).mkdir(parents=True)
    (store.scratch_dir(KEY) / "checkpoint").write_text("x")
    committed(store)
    assert not store.scratch_dir(KEY).exists()


def test_begin_removes_stale_attempts_of_the_same_key_only(store):
    store.dir.mkdir(parents=True)
    stale = store.dir / f".tmp-{KEY}-999-abcdef"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "partial.bin").write_text("x")
    other = store.dir / ".tmp-ffffffffffffffff-999-abcdef"
    other.mkdir()
    tmp = store.begin(KEY)
    assert not stale.exists()
    assert other.exists()
    assert tmp.is_dir() and tmp.name.startswith(f".tmp-{KEY}-{os.getpid()}-") and list(tmp.iterdir()) == []
    assert store.begin(KEY) != tmp and not tmp.exists()


def test_abandon_keeps_the_failed_attempt(store):
    tmp = store.begin(KEY)
    (tmp / "partial.txt").write_text("first")
    failed = store.abandon(tmp, KEY)
    assert failed == store.dir / f".failed-{KEY}"
    assert (failed / "partial.txt").read_text() == "first" and not tmp.exists()
    assert store.lookup(KEY) is None
    tmp = store.begin(KEY)
    (tmp / "other.txt").write_text("second")
    store.abandon(tmp, KEY)
    assert sorted(p.name for p in failed.iterdir()) == ["other.txt"]  # the latest failure only


def _hold_lock(root, key, log, barrier):
    store = StageStore(root, "exp", "default", "train")
    barrier.wait()
    for _ in range(3):
        with store.lock(key):
            with open(log, "a") as f:
                f.write(f"start {os.getpid()}\n")
                f.flush()
            time.sleep(0.02)
            with open(log, "a") as f:
                f.write(f"end {os.getpid()}\n")


def test_lock_serializes_processes(tmp_path):
    log = tmp_path / "log.txt"
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(4)
    workers = [
        context.Process(target=_hold_lock, args=(tmp_path / "runs", KEY, log, barrier)) for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    lines = log.read_text().splitlines()
    assert len(lines) == 24
    for start, end in zip(lines[::2], lines[1::2], strict=True):
        assert start.startswith("start ") and end == "end " + start.split()[1], lines


def test_locks_of_different_keys_are_independent(store, tmp_path):
    context = multiprocessing.get_context("fork")
    with store.lock(KEY):
        worker = context.Process(
            target=_hold_lock, args=(tmp_path / "runs", "f" * 16, tmp_path / "log.txt", context.Barrier(1))
        )
        worker.start()
        worker.join(timeout=30)
        assert worker.exitcode == 0
    assert len((tmp_path / "log.txt").read_text().splitlines()) == 6


def test_output_digest_ignores_manifest_and_log(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\x00\x01")
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "table.csv").write_text("a,b\n")
    before = output_digest(tmp_path)
    (tmp_path / MANIFEST).write_text("{}")
    (tmp_path / "stage.log").write_text("lots of logging")
    assert output_digest(tmp_path) == before
    (tmp_path / "stage.log").write_text("different logging")
    assert output_digest(tmp_path) == before


def test_output_digest_changes_with_artifacts(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"first")
    first = output_digest(tmp_path)
    (tmp_path / "model.bin").write_bytes(b"second version")
    second = output_digest(tmp_path)
    (tmp_path / "model.bin").rename(tmp_path / "renamed.bin")
    renamed = output_digest(tmp_path)
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "stage.log").write_text("not the top-level log")
    nested = output_digest(tmp_path)
    assert len({first, second, renamed, nested}) == 4


def test_output_digest_of_identical_trees_is_equal(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name / "sub").mkdir(parents=True)
        (tmp_path / name / "sub" / "x.txt").write_text("same")
        (tmp_path / name / "y.txt").write_text("also same")
    (tmp_path / "b" / MANIFEST).write_text('{"only": "in b"}')
    assert output_digest(tmp_path / "a") == output_digest(tmp_path / "b")
