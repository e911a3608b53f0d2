"""--executor ray: stages as tasks on a local Ray cluster (a head and two worker nodes with
logical GPUs), driven end to end by pytest runs in subprocesses."""

from __future__ import annotations

import json
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
    name="where", schema=None, metrics=("node", "gpu_ids", "cuda_visible", "value", "began", "ended")
)
def run(ctx):
    import ray

    node = ray.get_runtime_context().get_node_id()
    started = ctx.params.get("started")
    if started:  # tell the test which node to remove
        Path(started).write_text(node)
    ctx.log(f"on node {node[:8]}")
    began = time.time()
    time.sleep(ctx.params.get("sleep", 0))
    (ctx.out_dir / "value.txt").write_text(str(ctx.params["x"]))
    upstream = sum(up.metrics["value"] for up in ctx.upstream.values())
    return {
        "node": node,
        "gpu_ids": sorted(str(g) for g in ray.get_gpu_ids()),
        "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "value": ctx.params["x"] + upstream,
        "began": began,
        "ended": time.time(),
    }


def pytest_harness_stage_kinds():
    return [run]
"""


@pytest.fixture(scope="session")
def ray_cluster():
    """A head without CPUs (stages land on the workers) and two worker nodes with 2 logical GPUs."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "num_gpus": 0})
    for _ in range(2):
        cluster.add_node(**WORKER)
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
        node_id = marker.read_text()
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
        ray_cluster.add_node(**WORKER)  # the next tests see two workers again
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
