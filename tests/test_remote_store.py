"""A runs directory at an `s3://` URL, against a local S3 server: two machines (two harness
caches) share runs through it, a key is absent until its manifest is uploaded, and a lease
keeps two machines from computing one key at once."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from harness.core.remote_store import RemoteStore
from harness.core.store import StageStore

pytest.importorskip("s3fs")

# A matrix stage: its name holds `[`, `,` and `]`, which fsspec's globs would read as a pattern.
SPEC = """
stages:
  make:
    kind: python
    matrix: {n: [1, 2]}
    params: {function: "steps:make", args: {n: "${n}"}, metrics: [n]}
  total:
    kind: python
    needs: {a: "make[1]", b: "make[2]"}
    params: {function: "steps:total", metrics: [total]}
    gates: [total == 3]
"""

STEPS = """
def make(ctx):
    n = ctx.params["args"]["n"]
    (ctx.out_dir / "n.txt").write_text(str(n))
    return {"n": n}


def total(ctx):  # reads its upstreams' files, not their metrics: the artifacts must be here
    return {"total": sum(int((up.dir / "n.txt").read_text()) for up in ctx.upstream.values())}
"""


def _machine(pytester, url: str, cache: Path, *args: str):
    """A pytest run as on a machine whose harness cache (and so whose copy of the store) is `cache`."""
    pytester.makefile(".yaml", exp=SPEC)
    pytester.makepyfile(steps=STEPS)
    pytester.syspathinsert()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HARNESS_CACHE_DIR", str(cache))
        return pytester.runpytest_subprocess("exp.yaml", "--runs-dir", url, "-v", *args)


def test_a_second_machine_reuses_the_runs_of_the_first_through_the_store(pytester, s3_server, tmp_path):
    url = s3_server.url("shared")
    first = _machine(pytester, url, tmp_path / "machine-a")
    first.assert_outcomes(passed=3)
    uploaded = s3_server.keys("shared/exp/default/make[1]/")
    assert any(k.endswith("/manifest.json") for k in uploaded) and any(k.endswith("/n.txt") for k in uploaded)

    second = _machine(pytester, url, tmp_path / "machine-b")
    second.assert_outcomes(passed=3)
    assert second.stdout.str().count("cache hit") == 3  # every stage reused, none run again
    copies = list((tmp_path / "machine-b" / "stores").glob("*/exp/default/make[[]1]/*/n.txt"))
    assert [p.read_text() for p in copies] == ["1"]  # fetched into the second machine's copy


def test_a_key_whose_manifest_is_missing_is_absent(s3_server, tmp_path, monkeypatch):
    remote = RemoteStore(s3_server.url("absent"))
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "a"))
    writer = StageStore(remote.local_root(), "exp", "default", "s[1,2]", remote)
    with writer.lock("k1"):
        out = writer.begin("k1")
        (out / "weights.bin").write_bytes(b"\0" * 10)
        writer.commit(out, "k1", {"stage": "s[1,2]"}, {"m": 1})
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "b"))
    reader = StageStore(remote.local_root(), "exp", "default", "s[1,2]", remote)
    assert reader.lookup("k1").metrics == {"m": 1}

    # an upload that died before its manifest: the files are there, the key is not
    manifest = remote.remote(writer.rel, "k1", "manifest.json")
    remote.fs.rm_file(manifest)
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "c"))
    late = StageStore(remote.local_root(), "exp", "default", "s[1,2]", remote)
    assert late.lookup("k1") is None
    assert any(k.endswith("/k1/weights.bin") for k in s3_server.keys("absent/"))


def test_a_lease_keeps_a_second_machine_waiting_until_the_first_is_done(s3_server, tmp_path):
    remote = RemoteStore(s3_server.url("lease"))
    stores = [StageStore(tmp_path / name, "exp", "default", "train", remote) for name in ("a", "b")]
    held: list[tuple[str, float, float]] = []
    waited: list[dict] = []

    def work(name: str, store: StageStore) -> None:
        with store.lock("k", waiting=waited.append):
            began = time.time()
            time.sleep(1.5)
            held.append((name, began, time.time()))

    threads = [threading.Thread(target=work, args=(name, s)) for name, s in zip("ab", stores, strict=True)]
    for thread in threads:
        thread.start()
        time.sleep(0.3)
    for thread in threads:
        thread.join(timeout=30)
    (first, _, first_end), (second, second_start, _) = sorted(held, key=lambda h: h[1])
    assert second_start >= first_end  # never both at once
    assert len(waited) == 1 and waited[0]["holder"]  # the waiter was told who holds it
    assert not any(k.endswith(".lease") for k in s3_server.keys("lease/"))  # released


def test_the_lease_of_a_machine_that_died_expires(s3_server, tmp_path):
    remote = RemoteStore(s3_server.url("expiry"), lease_ttl_s=3)
    store = StageStore(tmp_path, "exp", "default", "train", remote)
    lease = remote.remote(store.rel, ".k.lease")
    remote.fs.pipe_file(lease, json.dumps({"holder": "dead:1:x", "expires": time.time() + 2}).encode())
    began = time.time()
    with store.lock("k"):
        waited = time.time() - began
    assert 1.5 < waited < 10  # waited for the dead holder's lease to expire, then took it


def test_the_lease_is_renewed_while_its_stage_runs(s3_server, tmp_path):
    remote = RemoteStore(s3_server.url("renew"), lease_ttl_s=1.5)
    store = StageStore(tmp_path, "exp", "default", "train", remote)
    rival = StageStore(tmp_path / "rival", "exp", "default", "train", remote)
    entered = []

    def rival_enters() -> None:
        with rival.lock("k"):
            entered.append(time.time())

    with store.lock("k"):
        rival_thread = threading.Thread(target=rival_enters, daemon=True)
        rival_thread.start()
        time.sleep(4)  # well past the TTL: only renewals keep the lease
        released = time.time()
    rival_thread.join(timeout=10)
    assert entered and entered[0] >= released


def test_an_unreachable_store_is_refused_with_the_reason(pytester, monkeypatch):
    pytest.importorskip("moto")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    pytester.makefile(".yaml", exp="stages:\n  a: {kind: python, params: {function: 'os:getcwd'}}\n")
    result = pytester.runpytest_subprocess("exp.yaml", "--runs-dir", "s3://nowhere/runs")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "cannot write to the store s3://nowhere/runs" in result.stderr.str()
    assert "AWS_ENDPOINT_URL" in result.stderr.str()
