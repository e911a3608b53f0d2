"""A runs directory at an fsspec URL (`s3://bucket/runs`, `gs://...`), seen by each machine
through a node-local copy under the harness cache.

The store keeps its rules there: a key is complete or absent. A run is uploaded file by
file with its manifest last, after any manifest of an earlier upload of the key was
deleted, so a key whose manifest is missing is absent whatever else lies under it. A
lease object per key, created only if absent (S3's `If-None-Match: *`) and renewed while
its stage runs, keeps two machines from computing the same stage at once; a holder that
died stops renewing and its lease expires.

Paths are handled one file at a time (`find`, `get_file`, `put_file`, `rm_file`): those
never glob, and matrix stage names such as `em[sycophancy,2027]` hold glob characters.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness.core.paths import cache_dir
from harness.core.store import LATEST, MANIFEST, TMP, StageStore

LEASE_TTL_S = 60.0  # a lease not renewed for this long belonged to a machine that died
POLL_S = 1.0  # how often a machine waiting for a lease looks again
INSTALL = "pip install -e '.[ray]'"


class RemoteStoreError(Exception):
    """The store's URL cannot be used: shown as its message."""


def is_url(location: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", location) is not None


class RemoteStore:
    """The store at `url`, and this machine's copy of what it read or wrote of it."""

    def __init__(self, url: str, lease_ttl_s: float = LEASE_TTL_S):
        self.url = url.rstrip("/")
        self.lease_ttl_s = lease_ttl_s
        self._fs: tuple[Any, str] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None}  # each machine connects with its own credentials

    def __repr__(self) -> str:
        return f"RemoteStore({self.url!r})"

    @property
    def fs(self) -> Any:
        return self._connect()[0]

    def _connect(self) -> tuple[Any, str]:
        if self._fs is None:
            try:
                fsspec = importlib.import_module("fsspec")
                self._fs = fsspec.core.url_to_fs(self.url)
            except ImportError as exc:
                raise RemoteStoreError(f"the store {self.url} needs {exc.name or exc}: {INSTALL}") from None
            except ValueError as exc:  # an unknown protocol
                raise RemoteStoreError(f"the store {self.url}: {exc}") from None
        return self._fs

    def remote(self, *parts: str) -> str:
        return "/".join((self._connect()[1], *parts))

    def local_root(self) -> Path:
        """Where this machine keeps its copy: `$HARNESS_CACHE_DIR/stores/<url>-<hash>`."""
        slug = re.sub(r"[^A-Za-z0-9]+", "-", self.url).strip("-")[-60:]
        return cache_dir() / "stores" / f"{slug}-{hashlib.sha256(self.url.encode()).hexdigest()[:8]}"

    def check(self) -> None:
        """Fail now, with the reason, when this machine cannot write to the store."""
        probe = self.remote(f".probe-{uuid.uuid4().hex[:8]}")
        try:
            self.fs.pipe_file(probe, b"probe")
            self.fs.rm_file(probe)
        except RemoteStoreError:
            raise
        except Exception as exc:
            raise RemoteStoreError(
                f"cannot write to the store {self.url}: {type(exc).__name__}: {exc}. Check the "
                "credentials of its filesystem (for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or "
                "a profile, and AWS_ENDPOINT_URL for a server that is not AWS)"
            ) from None

    def pull(self, stage: StageStore, key: str) -> bool:
        """Copy the complete run under `key` into the local copy; False when the store lacks it."""
        remote = self.remote(stage.rel, key)
        try:
            manifest = self.fs.cat_file(f"{remote}/{MANIFEST}")
        except FileNotFoundError:
            return False
        tmp = stage.dir / f"{TMP}{key}-pull-{uuid.uuid4().hex[:6]}"
        for path in self.fs.find(remote):
            rel = path[len(remote) + 1 :]
            if rel != MANIFEST:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(path, str(tmp / rel))
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / MANIFEST).write_bytes(manifest)  # last, as everywhere in the store
        try:
            os.replace(tmp, stage.key_dir(key))
        except OSError:  # another process of this machine pulled it first
            shutil.rmtree(tmp, ignore_errors=True)
        return True

    def push(self, stage: StageStore, key: str) -> None:
        """Upload the local run under `key`: the old manifest goes first, the new one last."""
        remote, local = self.remote(stage.rel, key), stage.key_dir(key)
        for path in sorted(self.fs.find(remote), key=lambda p: not p.endswith(f"/{MANIFEST}")):
            self.fs.rm_file(path)  # the manifest first: readers see the key absent from now on
        files = sorted(p for p in local.rglob("*") if p.is_file())
        for path in sorted(files, key=lambda p: p.name == MANIFEST and p.parent == local):
            self.fs.put_file(str(path), f"{remote}/{path.relative_to(local).as_posix()}")
        self.fs.pipe_file(self.remote(stage.rel, LATEST), key.encode())

    def manifests(self, stage: StageStore) -> dict[str, dict[str, Any]]:
        """The manifests of the stage's complete runs in the store, by key."""
        found, root = {}, self.remote(stage.rel)
        for path in self.fs.find(root, maxdepth=2):
            key, _, name = path[len(root) + 1 :].partition("/")
            if name == MANIFEST:
                manifest = json.loads(self.fs.cat_file(path))
                if manifest.get("complete") and manifest.get("key") == key:
                    found[key] = manifest
        return found

    def latest(self, stage: StageStore) -> str | None:
        try:
            return self.fs.cat_file(self.remote(stage.rel, LATEST)).decode().strip() or None
        except FileNotFoundError:
            return None

    @contextmanager
    def lease(
        self, stage: StageStore, key: str, waiting: Callable[[dict[str, Any]], None] | None = None
    ) -> Iterator[None]:
        """Hold the key's lease while the body runs, waiting for another holder to finish or die."""
        path = self.remote(stage.rel, f".{key}.lease")
        holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        told = False
        while not self._take(path, holder):
            if waiting is not None and not told:
                waiting(self._read(path) or {})
                told = True
            time.sleep(POLL_S)
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(path, holder, stop), daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()
            if (self._read(path) or {}).get("holder") == holder:
                self.fs.rm_file(path)

    def _lease_body(self, holder: str) -> bytes:
        return json.dumps({"holder": holder, "expires": time.time() + self.lease_ttl_s}).encode()

    def _take(self, path: str, holder: str) -> bool:
        try:
            self.fs.pipe_file(path, self._lease_body(holder), mode="create")
            return True
        except FileExistsError:
            current = self._read(path)
            if current is not None and current.get("expires", 0) < time.time():
                try:  # its holder stopped renewing it: it died
                    self.fs.rm_file(path)
                except FileNotFoundError:
                    pass
            return False

    def _read(self, path: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.fs.cat_file(path))
        except (FileNotFoundError, ValueError):
            return None

    def _renew(self, path: str, holder: str, stop: threading.Event) -> None:
        while not stop.wait(self.lease_ttl_s / 3):
            self.fs.pipe_file(path, self._lease_body(holder))
