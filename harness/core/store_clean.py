"""Store hygiene: remove what killed runs left behind in a runs directory.

A run killed at the wrong moment can leave a temporary output (`.tmp-<key>-*`), a
replaced run not yet deleted (`.old-<key>-*`), resume scratch (`.scratch-<key>`), a kept
failed attempt (`.failed-<key>`) or a `LATEST` naming a key that is not there. A later
successful run of the same key removes its own (`StageStore.remove_working_dirs`);
`pytest --harness-clean` calls `clean_store` for the rest.

Nothing that a running stage uses is touched: a key's working directories are removed
only while its lock can be taken at once. Resume scratch and failed attempts of a key
that never completed are kept (the next run of that key resumes from its scratch, and a
failure is kept for inspection) and reported, so a user can delete them knowingly.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from harness.core.store import FAILED, LATEST, OLD, SCRATCH, TMP, StageStore

_DISCARDABLE = (TMP, OLD)  # never of use once their owner is gone


@dataclass
class Cleaning:
    removed: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)  # resume scratch and failures of unfinished keys
    busy: list[Path] = field(default_factory=list)  # working directories of a key being run now


def clean_store(runs_dir: Path) -> Cleaning:
    """Remove, from every stage directory under `runs_dir`, the working directories of
    keys that no running stage holds and that are of no more use, and dangling LATESTs."""
    cleaning = Cleaning()
    for stage_dir in _stage_dirs(Path(runs_dir)):
        store = StageStore.at(stage_dir)
        for key in sorted({_key_of(path.name) for path in _working_dirs(stage_dir)}):
            _clean_key(store, key, cleaning)
        latest = stage_dir / LATEST
        if latest.is_file() and store.latest() is None:
            latest.unlink()
            cleaning.removed.append(latest)
    return cleaning


def _clean_key(store: StageStore, key: str, cleaning: Cleaning) -> None:
    paths = store.working_dirs(key)
    try:
        # the owner of a key's working directories holds its lock while it works
        with FileLock(store.lock_file(key), timeout=0):
            complete = store.lookup(key) is not None
            for path in paths:
                if complete or path.name.startswith(_DISCARDABLE):
                    shutil.rmtree(path, ignore_errors=True)
                    cleaning.removed.append(path)
                else:
                    cleaning.kept.append(path)
    except Timeout:
        cleaning.busy.extend(paths)


def _stage_dirs(runs_dir: Path) -> Iterator[Path]:
    """`<runs>/<experiment>/<profile>/<stage>` directories (reports beside them are files)."""
    for stage_dir in sorted(runs_dir.glob("*/*/*")):
        if stage_dir.is_dir() and not stage_dir.name.startswith("."):
            yield stage_dir


def _working_dirs(stage_dir: Path) -> Iterator[Path]:
    prefixes = (TMP, OLD, SCRATCH, FAILED)
    return (path for path in stage_dir.iterdir() if path.is_dir() and path.name.startswith(prefixes))


def _key_of(name: str) -> str:
    """`.tmp-<key>-<pid>-<salt>` / `.old-<key>-<salt>` / `.scratch-<key>` -> key."""
    return name.split("-", 2)[1]
