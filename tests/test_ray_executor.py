"""--executor ray: stages as tasks on a local Ray cluster (a head and two worker nodes with
logical GPUs), driven end to end by pytest runs in subprocesses."""

from __future__ import annotations

import itertools
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

# the Ray tests share one cluster: under xdist they run on one worker
pytestmark = pytest.mark.xdist_group("ray-cluster")

WORKER = {"num_cpus": 2, "num_gpus": 2}

# A kind that records where it ran: its node, the GPU ids Ray gave it and what CUDA sees.
NODE_KIND = """
import os
import time
from pathlib import Path

from harness.api import stage_kind


@stage_kind(
    name="where",
    schema=None,
    metrics=("node", "gpu_ids", "cuda_visible", "value", "began", "ended", "cache", "pid"),
)
def run(ctx):
    import ray

    node = ray.get_runtime_context().get_node_id()
    started = ctx.params.get("started")
    if started:  # tell the test which node (and process) runs it
        Path(started).write_text(f"{node} {os.getpid()}")
    ctx.log(f"on node {node[:8]}")
    began = time.time()
    time.sleep(ctx.params.get("sleep", 0))
    # from the upstreams' files, not their metrics: their artifacts must be on this node
    value = ctx.params["x"] + sum(int((up.dir / "value.txt").read_text()) for up in ctx.upstream.values())
    (ctx.out_dir / "value.txt").write_text(str(value))
    return {
        "node": node,
        "gpu_ids": sorted(str(g) for g in ray.get_gpu_ids()),
        "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "value": value,
        "began": began,
        "ended": time.time(),
        "cache": os.environ.get("HARNESS_CACHE_DIR"),
        "pid": os.getpid(),
    }


def pytest_harness_stage_kinds():
    return [run]
"""


@pytest.fixture(scope="session")
def ray_cluster(s3_server, tmp_path_factory):
    """A head without CPUs (stages land on the workers) and two worker nodes with 2 logical
    GPUs, each with its own harness cache (so its own copy of a store at a URL). The nodes
    reach the S3 server: they are started after its variables are set."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "num_gpus": 0})
    caches, numbers = tmp_path_factory.mktemp("node-caches"), itertools.count()
    cluster.add_worker = lambda: cluster.add_node(  # the node-death test adds one back
        **WORKER, env_vars={"HARNESS_CACHE_DIR": str(caches / f"node-{next(numbers)}")}
    )
    for _ in range(2):
        cluster.add_worker()
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def _run(pytester, spec: str, runs: Path, cluster, *args: str):
    pytester.makeconftest(NODE_KIND)
    pytester.makefile(".yaml", exp=spec)
    return pytester.runpytest_subprocess(
        "exp.yaml", "--runs-dir", str(runs), "--executor", "ray", "--ray-address", cluster.address, *args
    )


def _metrics(runs: Path) -> dict[str, dict]:
    """The metrics of each stage's latest complete run in the store."""
    found = {}
    for latest in runs.glob("*/default/*/LATEST"):
        key = latest.read_text().strip()
        found[latest.parent.name] = json.loads((latest.parent / key / "metrics.json").read_text())
    return found


def test_independent_stages_run_at_once_on_different_nodes_and_a_second_run_submits_nothing(
    pytester, ray_cluster, tmp_path
):
    spec = "stages:\n" + "".join(
        f"  s{i}: {{kind: where, params: {{x: {i}, sleep: 4}}, resources: {{gpus: 1, cpus: 1}}}}\n"
        for i in range(4)
    )
    spec += "  total: {kind: where, needs: [s0, s1, s2, s3], params: {x: 0}, gates: [value == 6]}\n"
    spec += "  final: {kind: where, needs: [total], params: {x: 1}, gates: [value == 7]}\n"
    runs = tmp_path / "runs"
    result = _run(pytester, spec, runs, ray_cluster, "-v")
    result.assert_outcomes(passed=6)
    metrics = _metrics(runs)
    placed = [metrics[f"s{i}"] for i in range(4)]
    workers = {node.node_id for node in ray_cluster.worker_nodes}
    assert {m["node"] for m in placed} == workers  # four 1-GPU stages on two 2-GPU nodes
    for m in placed:
        assert len(m["gpu_ids"]) == 1
        assert m["cuda_visible"] == m["gpu_ids"][0]  # the stage sees only its GPU
    assert max(m["began"] for m in placed) < min(m["ended"] for m in placed)  # all four at once
    assert len({(m["node"], m["gpu_ids"][0]) for m in placed}) == 4  # and no two shared a GPU
    assert metrics["total"]["value"] == 6

    again = _run(pytester, spec, runs, ray_cluster, "-v")
    again.assert_outcomes(passed=6)
    assert "harness executor ray: submitted 0 stages" in again.stdout.str()


def test_a_stage_whose_node_dies_is_retried_on_another_node(pytester, ray_cluster, tmp_path):
    marker = tmp_path / "started"
    spec = (
        "stages:\n"
        f"  a: {{kind: where, params: {{x: 5, sleep: 6, started: '{marker}'}}, resources: {{gpus: 2}}}}\n"
        "  b: {kind: where, needs: [a], params: {x: 1}, gates: [value == 6]}\n"
    )
    removed = []

    def remove_the_node_it_runs_on():
        deadline = time.time() + 120
        while not marker.exists() and time.time() < deadline:
            time.sleep(0.2)
        node_id = marker.read_text().split()[0]
        node = next(n for n in ray_cluster.worker_nodes if n.node_id == node_id)
        marker.unlink()
        ray_cluster.remove_node(node, allow_graceful=False)
        removed.append(node_id)

    killer = threading.Thread(target=remove_the_node_it_runs_on, daemon=True)
    killer.start()
    runs = tmp_path / "runs"
    try:
        result = _run(pytester, spec, runs, ray_cluster)
    finally:
        killer.join(timeout=5)
        ray_cluster.add_worker()  # the next tests see two workers again
        ray_cluster.wait_for_nodes()
    result.assert_outcomes(passed=2)
    metrics = _metrics(runs)
    assert removed and metrics["a"]["node"] != removed[0]  # finished on the other node
    assert metrics["b"]["value"] == 6
    store = runs / "exp" / "default" / "a"
    assert len([d for d in store.iterdir() if d.is_dir() and not d.name.startswith(".")]) == 1


PLANTED = Path(__file__).resolve().parents[1] / "experiments" / "planted_signal.yaml"


def test_a_shipped_spec_gives_the_same_metrics_under_ray_as_locally(pytester, ray_cluster, tmp_path):
    """planted_signal (python stages importing the spec's own modules) rather than the tiny
    cubic_gravity, whose five minutes here would double the CI time for the same check."""
    local, remote = tmp_path / "local", tmp_path / "ray"
    args = (str(PLANTED), "--profile", "tiny", "-p", "no:cacheprovider")
    pytester.runpytest_subprocess(*args, "--runs-dir", str(local)).assert_outcomes(passed=2)
    on_ray = pytester.runpytest_subprocess(
        *args, "--runs-dir", str(remote), "--executor", "ray", "--ray-address", ray_cluster.address
    )
    on_ray.assert_outcomes(passed=2)
    assert "submitted 2 stages" in on_ray.stdout.str()

    def stored(runs: Path) -> dict[str, tuple]:
        found = {}
        for latest in runs.glob("planted_signal/tiny/*/LATEST"):
            key = latest.read_text().strip()
            found[latest.parent.name] = (key, (latest.parent / key / "metrics.json").read_text())
        return found

    assert stored(remote) == stored(local) and len(stored(local)) == 2  # same keys, same metrics


def test_without_ray_the_executor_says_how_to_install_it(pytester):
    pytester.makeconftest("import sys\nsys.modules['ray'] = None  # as if not installed\n")
    pytester.makefile(".yaml", exp="stages:\n  a: {kind: python, params: {function: 'os:getcwd'}}\n")
    result = pytester.runpytest_subprocess("exp.yaml", "--executor", "ray")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--executor ray needs Ray: pip install -e '.[ray]'" in result.stderr.str()


def test_resources_come_from_the_stage_and_its_profile_and_stay_out_of_the_key(tmp_path):
    from harness.core.execution import stage_recipe
    from harness.core.executors import ray_resources
    from harness.core.experiment import load_experiment

    spec = tmp_path / "exp.yaml"
    spec.write_text(
        "stages:\n"
        "  a: {kind: python, params: {function: 'os:getcwd'}, resources: {gpus: 1, cpus: 4, memory_gb: 2}}\n"
        "profiles:\n"
        "  tiny: {stages: {a: {resources: {gpus: 0}}}}\n"
    )
    full, tiny = load_experiment(spec), load_experiment(spec, "tiny")
    assert ray_resources(full.stages["a"].resources) == {"num_cpus": 4, "num_gpus": 1, "memory": 2 * 2**30}
    assert ray_resources(tiny.stages["a"].resources) == {"num_cpus": 4, "memory": 2 * 2**30}
    assert stage_recipe(full.stages["a"], full) == stage_recipe(tiny.stages["a"], tiny)


def _copy_metrics(root: Path) -> dict[str, dict]:
    """The metrics of each stage in a machine's copy of a store at a URL (one key per stage)."""
    return {
        path.parent.parent.name: json.loads(path.read_text())
        for path in root.glob("stores/*/exp/default/*/*/metrics.json")
    }


def test_nodes_that_share_only_an_s3_store_pass_artifacts_through_it(
    pytester, ray_cluster, s3_server, tmp_path, monkeypatch
):
    spec = (
        "stages:\n"  # two stages of 2 GPUs at once: on the two nodes
        "  s0: {kind: where, params: {x: 1, sleep: 3}, resources: {gpus: 2}}\n"
        "  s1: {kind: where, params: {x: 2, sleep: 3}, resources: {gpus: 2}}\n"
        "  total: {kind: where, needs: [s0, s1], params: {x: 0}, gates: [value == 3]}\n"
    )
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "driver"))
    result = _run(pytester, spec, s3_server.url("on-ray"), ray_cluster, "-v")
    result.assert_outcomes(passed=3)
    metrics = _copy_metrics(tmp_path / "driver")  # the driver fetched every result
    assert metrics["s0"]["node"] != metrics["s1"]["node"]
    assert metrics["s0"]["cache"] != metrics["s1"]["cache"]  # no directory shared by the nodes
    where_total_ran = Path(metrics["total"]["cache"])
    upstream_copies = list(where_total_ran.glob("stores/*/exp/default/s[01]/*/value.txt"))
    assert sorted(p.read_text() for p in upstream_copies) == ["1", "2"]  # one of them made elsewhere
    assert len([k for k in s3_server.keys("on-ray/") if k.endswith("/manifest.json")]) == 3


def _namespaces_work() -> bool:
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _namespaces_work(), reason="needs mount namespaces (unshare -Urm)")
def test_a_runs_directory_the_nodes_cannot_see_is_refused(pytester, ray_cluster, tmp_path):
    """The driver runs in a mount namespace of its own with a private filesystem at the
    runs directory: a node-local path, as on a cluster whose nodes do not mount it."""
    private = tmp_path / "private"
    private.mkdir()
    pytester.makeconftest(NODE_KIND)
    pytester.makefile(".yaml", exp="stages:\n  a: {kind: where, params: {x: 1}}\n")
    pytest_command = (
        f"{sys.executable} -m pytest exp.yaml -p no:cacheprovider --runs-dir {private}/runs "
        f"--executor ray --ray-address {ray_cluster.address}"
    )
    refused = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", f"mount -t tmpfs none {private} && exec {pytest_command}"],
        cwd=pytester.path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert refused.returncode == pytest.ExitCode.USAGE_ERROR, refused.stdout + refused.stderr
    assert f"the runs directory {private}/runs is not shared with 3 of the 3 nodes" in refused.stderr
    assert "NFS, Lustre" in refused.stderr


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a zombie has ended


def test_ctrl_c_cancels_the_submitted_stages(pytester, ray_cluster, tmp_path):
    marker = tmp_path / "started"
    spec = (
        "stages:\n"
        f"  slow: {{kind: where, params: {{x: 1, sleep: 300, started: '{marker}'}}}}\n"
        "  after: {kind: where, needs: [slow], params: {x: 1}}\n"
    )
    pytester.makeconftest(NODE_KIND)
    pytester.makefile(".yaml", exp=spec)
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "pytest", "exp.yaml", "-p", "no:cacheprovider", "--runs-dir", str(runs)]
    pytest_run = pytester.popen(
        [*command, "--executor", "ray", "--ray-address", ray_cluster.address], stdin=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.2)
    pid = int(marker.read_text().split()[1])
    pytest_run.send_signal(signal.SIGINT)
    assert pytest_run.wait(timeout=60) == pytest.ExitCode.INTERRUPTED
    deadline = time.time() + 30
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(pid)  # the stage's process was stopped, not left to run for 5 minutes
    stage_dir = runs / "exp" / "default" / "slow"
    assert not [d for d in stage_dir.iterdir() if d.is_dir() and not d.name.startswith(".")]
