"""The artifact store: `<runs>/<experiment>/<profile>/<stage>/<key>/`.

A stage writes into a temporary directory that is renamed into place only after
`metrics.json` and a complete `manifest.json` are written, so a directory under a key
is either complete or absent. A lock per (stage, key) makes concurrent workers safe.

Beside the key directories, a stage directory holds working directories named
`.<what>-<key>[-...]` (TMP, OLD, SCRATCH, FAILED): a successful run of a key removes its
own, and `harness.core.store_clean` removes those of killed runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

if TYPE_CHECKING:
    from harness.core.remote_store import RemoteStore

MANIFEST = "manifest.json"
METRICS = "metrics.json"
LATEST = "LATEST"
TMP, OLD, SCRATCH, FAILED = ".tmp-", ".old-", ".scratch-", ".failed-"  # prefixes of working dirs
NOT_OUTPUTS = {MANIFEST, "stage.log"}  # left out of the output digest


def is_output(rel: str) -> bool:
    """Whether a file counts for the output digest: not the manifest or log, nor a
    `*metadata.json`, which records how a run went (times, throughput, usage), not what it
    produced. Stages keep such values there, never in their metrics or other artifacts:
    a rerun that reproduces a stage's results then keeps the keys of the stages after it."""
    return rel not in NOT_OUTPUTS and not rel.endswith("metadata.json")


@dataclass(frozen=True)
class Record:
    """A complete stage run in the store."""

    dir: Path
    manifest: dict[str, Any]
    metrics: dict[str, Any]

    @property
    def digest(self) -> str:
        return self.manifest["output_digest"]


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the new, never a part."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """One JSON object per line, non-ASCII kept readable."""
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_json(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def relative_path(path: Path | str, start: Path) -> str:
    """How an artifact names a file outside it: relative to `start` (the stage's own
    directory for another stage's output, the spec's directory for an input file), so
    that its bytes, and the output digest, do not depend on where the store, the
    project or the cache lies."""
    return Path(os.path.relpath(path, start)).as_posix()


_digests: dict[tuple[str, int, int], str] = {}  # per process, by (path, size, mtime)


def file_digest(path: Path) -> str:
    """sha256 of a file's content, or of a directory's relative paths and contents."""
    stat = path.stat()
    memo_key = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo_key in _digests:
        return _digests[memo_key]
    h = hashlib.sha256()
    if path.is_dir():
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(child.relative_to(path).as_posix().encode() + b"\0")
            h.update(file_digest(child).encode())
        digest = h.hexdigest()
    else:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()
        _digests[memo_key] = digest
    return digest


def output_digest(directory: Path) -> str:
    h = hashlib.sha256()
    for child in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = child.relative_to(directory).as_posix()
        if not is_output(rel):
            continue
        h.update(rel.encode() + b"\0" + file_digest(child).encode())
    return h.hexdigest()[:16]


class StageStore:
    """The store directory of one stage of one experiment and profile: under `root` on this
    machine, and at `remote` too when the runs directory is a URL (`root` is then this
    machine's copy of it: lookups fetch from `remote`, commits upload to it)."""

    def __init__(
        self, root: Path, experiment: str, profile: str, stage: str, remote: RemoteStore | None = None
    ):
        self.rel = f"{experiment}/{profile}/{stage}"
        self.dir = Path(root) / self.rel
        self.remote = remote

    @classmethod
    def at(cls, directory: Path) -> StageStore:
        """The store whose stage directory is `directory`."""
        profile = directory.parent
        return cls(profile.parent.parent, profile.parent.name, profile.name, directory.name)

    def lock_file(self, key: str) -> Path:
        return self.dir / f".{key}.lock"

    def key_dir(self, key: str) -> Path:
        return self.dir / key

    def scratch_dir(self, key: str) -> Path:
        return self.dir / f"{SCRATCH}{key}"

    def lookup(self, key: str) -> Record | None:
        """The complete run under `key`, or None. Incomplete directories never count."""
        record = self._lookup_here(key)
        if record is None and self.remote is not None and self.remote.pull(self, key):
            record = self._lookup_here(key)
        return record

    def _lookup_here(self, key: str) -> Record | None:
        directory = self.key_dir(key)
        manifest = read_json(directory / MANIFEST)
        if not isinstance(manifest, dict) or not manifest.get("complete") or manifest.get("key") != key:
            return None
        metrics = read_json(directory / METRICS)
        if not isinstance(metrics, dict) or "output_digest" not in manifest:
            return None
        return Record(directory, manifest, metrics)

    def records(self) -> Iterator[Record]:
        """Every complete run of this stage in the store, whatever its key."""
        if self.dir.is_dir():
            for directory in sorted(self.dir.iterdir()):
                record = self.lookup(directory.name) if directory.is_dir() else None
                if record is not None:
                    yield record

    def manifests(self) -> dict[str, dict[str, Any]]:
        """The manifest of every complete run of this stage, by key: in this machine's copy and,
        with a remote store, there too (read without fetching the runs)."""
        found = {r.manifest["key"]: r.manifest for r in self.records()}
        if self.remote is not None:
            found = {**self.remote.manifests(self), **found}
        return found

    def latest(self) -> dict[str, Any] | None:
        """The manifest of the last complete run of this stage, whatever its key."""
        key = self.remote.latest(self) if self.remote is not None else None  # the store's word first
        if key is None:
            try:
                key = (self.dir / LATEST).read_text().strip()
            except OSError:
                return None
        record = self.lookup(key) if key else None
        return record.manifest if record else None

    @contextmanager
    def lock(self, key: str, waiting: Callable[[dict[str, Any]], None] | None = None) -> Iterator[None]:
        """Hold the key against the other processes of this machine, and of every machine
        through the remote store's lease (`waiting` is told once of a holder to wait for)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with FileLock(self.lock_file(key)):
            if self.remote is None:
                yield
            else:
                with self.remote.lease(self, key, waiting):
                    yield

    def begin(self, key: str) -> Path:
        """A fresh temporary output directory; call with the lock held.

        Leftovers of attempts that died half-way (same key) are removed first.
        """
        for stale in self.dir.glob(f"{TMP}{key}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.dir / f"{TMP}{key}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, key: str, manifest: Mapping[str, Any], metrics: Mapping[str, Any]) -> Record:
        """Write metrics and manifest into `tmp`, then rename it to the key directory."""
        write_json(tmp / METRICS, metrics)
        manifest = {**manifest, "key": key, "output_digest": output_digest(tmp), "complete": True}
        write_json(tmp / MANIFEST, manifest)
        final = self.key_dir(key)
        if final.exists():  # forced rerun, or a damaged directory: move it out of the way
            os.replace(final, self.dir / f"{OLD}{key}-{uuid.uuid4().hex[:6]}")
        os.replace(tmp, final)
        write_text_atomic(self.dir / LATEST, key)
        self.remove_working_dirs(key)
        if self.remote is not None:
            self.remote.push(self, key)
        return Record(final, dict(manifest), dict(metrics))

    def working_dirs(self, key: str) -> list[Path]:
        """The working directories of `key`: temporary outputs, replaced runs, resume scratch
        and a kept failed attempt (the owner of each holds the key's lock while it works)."""
        patterns = (f"{TMP}{key}-*", f"{OLD}{key}-*", f"{SCRATCH}{key}", f"{FAILED}{key}")
        return sorted(path for pattern in patterns for path in self.dir.glob(pattern))

    def remove_working_dirs(self, key: str) -> None:
        """After `key` completed: what earlier attempts of it left is of no more use."""
        for path in self.working_dirs(key):
            shutil.rmtree(path, ignore_errors=True)

    def abandon(self, tmp: Path, key: str) -> Path:
        """Keep a failed attempt's outputs for inspection at `.failed-<key>`."""
        failed = self.dir / f"{FAILED}{key}"
        shutil.rmtree(failed, ignore_errors=True)
        os.replace(tmp, failed)
        return failed
