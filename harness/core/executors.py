"""Executors: where the stages of a pytest run execute.

`local` (the default) runs each stage in the pytest process when its item asks for it.
`ray` submits, when the run starts, every stage that is to run as a Ray task whose
arguments are the results (keys, directories, metrics) or task handles of its upstream
stages: Ray starts each as soon as its upstreams are done, on a node with the resources
the stage declares, and each pytest item waits for its own stage. Only keys travel; the
artifacts stay in the runs directory, which every node must see: a shared filesystem, or a
URL (harness.core.remote_store) that each node copies from and uploads to.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from harness.core.execution import ExperimentRun, StageResult, StageTask
from harness.core.outcomes import Status

EXECUTORS = ("local", "ray", "submitit")
INSTALL_RAY = "pip install -e '.[ray]'"
INSTALL_SUBMITIT = "pip install -e '.[submitit]'"


class ExecutorError(Exception):
    """A usage problem with the chosen executor, shown as its message."""


class LocalExecutor:
    """Each stage runs in the pytest process, when its item (or a downstream one) asks for it."""

    name = "local"

    def for_run(self) -> None:
        return None  # ExperimentRun then runs stages itself

    def start(self, runs: Iterable[ExperimentRun]) -> int:
        return 0

    def cancel(self) -> None:
        pass

    def close(self) -> None:
        pass


class RayExecutor:
    """Stages as Ray tasks on the cluster at `address` (None: RAY_ADDRESS, else a local one)."""

    name = "ray"

    def __init__(self, address: str | None, max_retries: int, runs_dir: Path | None):
        try:
            self.ray = importlib.import_module("ray")
        except ImportError:
            raise ExecutorError(f"--executor ray needs Ray: {INSTALL_RAY}") from None
        self.address = address
        self.max_retries = max_retries
        self.runs_dir = runs_dir
        self.pending: dict[Any, None] = {}  # handles not yet waited for, in submission order
        self._remote = None
        self._owns_ray = False

    def for_run(self) -> RayExecutor:
        return self

    def start(self, runs: Iterable[ExperimentRun]) -> int:
        return sum(run.submit_ahead() for run in runs if not run.started)

    def _connect(self) -> None:
        ray = self.ray
        if not ray.is_initialized():
            ray.init(address=self.address, namespace="harness", log_to_driver=True)
            self._owns_ray = True
        if self.runs_dir is not None:  # a path, not a URL: every node must see it
            check_shared_store(ray, self.runs_dir)
        self._remote = ray.remote(_run_task)

    def submit(self, task: StageTask, upstream: list[Any], resources: Mapping[str, float]) -> Any:
        if self._remote is None:
            self._connect()
        _pickle_conftest_kinds(self.ray.cloudpickle, task)
        handle = self._remote.options(
            name=f"{task.experiment.name}::{task.stage}",
            max_retries=self.max_retries,
            **ray_resources(resources),
        ).remote(task, *upstream)
        self.pending[handle] = None
        return handle

    def wait(self, handle: Any) -> StageResult:
        result = self.ray.get(handle)  # on Ctrl-C the handle stays pending: `close` cancels it
        self.pending.pop(handle, None)
        return result

    def cancel(self) -> None:
        """Cancel the tasks no item has waited for (Ctrl-C, or a run stopped by -x)."""
        for handle in list(self.pending):
            self.ray.cancel(handle, force=True)
        self.pending.clear()

    def close(self) -> None:
        self.cancel()
        if self._owns_ray:
            self.ray.shutdown()


def _run_task(task: StageTask, *upstream: StageResult) -> StageResult:
    return task(*upstream)


def ray_resources(resources: Mapping[str, float]) -> dict[str, float]:
    """A stage's `resources:` as Ray task options: one CPU unless it says otherwise."""
    options: dict[str, float] = {"num_cpus": resources.get("cpus", 1)}
    if resources.get("gpus"):
        options["num_gpus"] = resources["gpus"]  # Ray sets the task's CUDA_VISIBLE_DEVICES to them
    if resources.get("memory_gb"):
        options["memory"] = int(resources["memory_gb"] * 2**30)
    return options


def _pickle_conftest_kinds(cloudpickle: Any, task: StageTask) -> None:
    """A kind defined in a conftest.py cannot be imported by name on a worker: send its code."""
    module = sys.modules.get(task.experiment.stages[task.stage].kind.module)
    if module is not None and Path(getattr(module, "__file__", "") or "").name == "conftest.py":
        cloudpickle.register_pickle_by_value(module)


def check_shared_store(ray: Any, runs_dir: Path) -> None:
    """Refuse a runs directory that some node of the cluster cannot see. Checked when the
    cluster has more than one node: the driver writes a token file in the runs directory
    and a task pinned to each alive node reads it back."""
    nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    if len(nodes) < 2:
        return
    runs_dir.mkdir(parents=True, exist_ok=True)
    token = runs_dir / f".probe-{uuid.uuid4().hex[:8]}"
    token.write_text(token.name)
    try:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        probe = ray.remote(_sees)
        seen = ray.get(
            [
                probe.options(
                    num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
                ).remote(str(token))
                for node in nodes
            ]
        )
    finally:
        token.unlink(missing_ok=True)
    blind = [node for node, ok in zip(nodes, seen, strict=True) if not ok]
    if blind:
        raise ExecutorError(
            f"the runs directory {runs_dir} is not shared with {len(blind)} of the {len(nodes)} nodes "
            f"of the Ray cluster (e.g. node {blind[0][:12]}): put it on a filesystem every node mounts "
            "at the same path (NFS, Lustre) and pass it with --runs-dir"
        )


def _sees(path: str) -> bool:
    return os.path.exists(path)


class SubmititExecutor:
    """Stages as submitit jobs: on Slurm where `sbatch` is found, else as local processes.

    Slurm cannot take a job's arguments from jobs that have not run yet, so a stage is
    submitted once its upstream stages' jobs are done, with their results; the pytest
    process does this while its items wait (`wait` polls). Independent stages are queued at
    once and run as Slurm schedules them. The job folder (`.submitit` in the runs directory)
    must be on a filesystem the compute nodes share, as submitit requires."""

    name = "submitit"
    POLL_S = 0.5

    def __init__(self, folder: Path, parameters: Mapping[str, Any]):
        try:
            submitit = importlib.import_module("submitit")
        except ImportError:
            raise ExecutorError(f"--executor submitit needs submitit: {INSTALL_SUBMITIT}") from None
        self.cloudpickle = importlib.import_module("cloudpickle")
        self.submitit, self.folder = submitit, folder
        self.parameters = {"timeout_min": 24 * 60, **parameters}
        self.held: list[_Held] = []  # stages whose upstream jobs are not all done
        self.jobs: list[Any] = []

    def for_run(self) -> SubmititExecutor:
        return self

    def start(self, runs: Iterable[ExperimentRun]) -> int:
        return sum(run.submit_ahead() for run in runs if not run.started)

    def submit(self, task: StageTask, upstream: list[Any], resources: Mapping[str, float]) -> _Held:
        _pickle_conftest_kinds(self.cloudpickle, task)
        held = _Held(task, upstream, resources)
        self.held.append(held)
        self._release()
        return held

    def _release(self) -> None:
        """Submit every held stage whose upstream jobs are all done."""
        for held in list(self.held):
            if not all(up.done() for up in held.upstream if isinstance(up, _Held)):
                continue
            self.held.remove(held)
            try:
                results = [up.result() if isinstance(up, _Held) else up for up in held.upstream]
            except Exception as exc:  # an upstream job was lost: the stage is not submitted
                held.error = exc
                continue
            if any(r.status not in (Status.RAN, Status.REUSED) or r.abort for r in results):
                held.error = ExecutorError(f"{held.task.stage}: an upstream stage did not finish")
                continue  # the pytest process reports it skipped without waiting for it
            executor = self.submitit.AutoExecutor(folder=self.folder)  # parameters of this job alone
            executor.update_parameters(
                name=f"{held.task.experiment.name}::{held.task.stage}",
                **submitit_resources(held.resources),
                **self.parameters,
            )
            held.job = executor.submit(_run_task, held.task, *results)
            self.jobs.append(held.job)

    def wait(self, handle: _Held) -> StageResult:
        while not handle.done():
            self._release()
            time.sleep(self.POLL_S)
        return handle.result()

    def cancel(self) -> None:
        for job in self.jobs:
            if not job.done():
                job.cancel(check=False)
        self.held.clear()

    def close(self) -> None:
        self.cancel()


class _Held:
    """A stage for submitit: its job once submitted, or why it never will be."""

    def __init__(self, task: StageTask, upstream: list[Any], resources: Mapping[str, float]):
        self.task, self.upstream, self.resources = task, upstream, resources
        self.job: Any = None
        self.error: BaseException | None = None

    def done(self) -> bool:
        return self.error is not None or (self.job is not None and self.job.done())

    def result(self) -> StageResult:
        if self.error is not None:
            raise self.error
        return self.job.result()


def submitit_resources(resources: Mapping[str, float]) -> dict[str, Any]:
    """A stage's `resources:` as submitit's (Slurm's) parameters: one CPU unless it says otherwise."""
    options: dict[str, Any] = {"cpus_per_task": int(resources.get("cpus", 1))}
    if resources.get("gpus"):
        options["gpus_per_node"] = int(resources["gpus"])
    if resources.get("memory_gb"):
        options["mem_gb"] = resources["memory_gb"]
    return options


def make_executor(
    name: str,
    address: str | None,
    max_retries: int,
    runs_dir: Path,
    shared_by_url: bool = False,
    submitit_parameters: Mapping[str, Any] | None = None,
):
    """The executor `name`. `runs_dir` is this machine's runs directory, a copy of a store at
    a URL when `shared_by_url` (the nodes then share the URL, not the directory)."""
    if name == "ray":
        address = address or os.environ.get("RAY_ADDRESS") or None
        return RayExecutor(address, max_retries, None if shared_by_url else runs_dir)
    if name == "submitit":
        return SubmititExecutor(runs_dir / ".submitit", submitit_parameters or {})
    return LocalExecutor()
