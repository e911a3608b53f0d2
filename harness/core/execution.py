"""Resolve a stage: reuse it from the store or run it, after the stages it needs."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from harness.core.code_digest import closure_of
from harness.core.experiment import Experiment, StageSpec
from harness.core.gates import GateResult, evaluate
from harness.core.graph import stage_key, without
from harness.core.outcomes import Outcome, Status
from harness.core.progress import running_stage
from harness.core.provenance import git_commit, package_versions
from harness.core.remote_store import RemoteStore
from harness.core.seeding import seed_everything
from harness.core.stage import StageContext, StageError, StageKind, Upstream
from harness.core.store import Record, StageStore, file_digest


@dataclass
class StageResult:
    experiment: str
    stage: str
    kind: str
    status: Status
    reason: str  # why it ran, why it was reused, why it failed or was skipped
    key: str | None = None
    dir: Path | None = None
    digest: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    gates: list[GateResult] = field(default_factory=list)
    duration_s: float = 0.0
    error: BaseException | None = None
    gates_required: bool = True  # False in a rehearsal: its gates are reported, never fail or abort

    @property
    def abort(self) -> GateResult | None:
        return next((g for g in self.gates if g.aborted), None) if self.gates_required else None

    @property
    def failed_gates(self) -> list[GateResult]:
        return [g for g in self.gates if not g.passed] if self.gates_required else []

    @property
    def outcome(self) -> Outcome:
        if self.status == Status.FAILED:
            return Outcome.ERROR
        if self.status == Status.SKIPPED:
            return Outcome.SKIPPED
        if self.abort:
            return Outcome.ABORTED
        return Outcome.FAILED if self.failed_gates else Outcome.PASSED

    def to_json(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "stage": self.stage,
            "kind": self.kind,
            "status": self.status.value,  # plain words: xdist sends this to the controller
            "outcome": self.outcome.value,
            "reason": self.reason,
            "key": self.key,
            "dir": str(self.dir) if self.dir else None,
            "duration_s": round(self.duration_s, 3),
            "metrics": self.metrics,
            "gates": [
                {
                    "gate": g.gate.text,
                    "metric": g.gate.subject,
                    "value": g.value,
                    "op": g.gate.op,
                    "threshold": g.gate.threshold,
                    "abort": f"{g.gate.abort_op} {g.gate.abort_threshold:g}" if g.gate.abort_op else None,
                    "passed": g.passed,
                    "aborted": g.aborted and self.gates_required,
                    "problem": g.problem,
                    "where": g.gate.where,
                }
                for g in self.gates
            ],
        }


class ExperimentRun:
    """The stages of one experiment, resolved for the pytest items that ask for them.

    With the local executor a stage runs in this process when its item (or a downstream
    one) asks for it. With a cluster executor (harness.core.executors) `submit_ahead` hands
    every stage that is to run to the executor first, and items wait for their results."""

    def __init__(
        self,
        experiment: Experiment,
        runs_dir: Path,
        rerun: frozenset[str] = frozenset(),
        progress: Callable[[str], None] = lambda line: None,
        executor: Executor | None = None,
        remote: RemoteStore | None = None,
    ):
        self.experiment = experiment
        self.runs_dir = Path(runs_dir)  # with a remote store: this machine's copy of it
        self.remote = remote
        self.rerun = rerun
        self.progress = progress
        self.executor = executor
        self.results: dict[str, StageResult] = {}
        self._fresh: list[StageResult] = []
        self._told: set[str] = set()  # stages whose results an item has reported
        self._prepared: dict[str, tuple[dict[str, Any], dict[str, str]]] = {}
        self._submitted: dict[str, Any] = {}  # stage -> the executor's handle
        self.started = False
        self.announced = False

    def take_fresh(self) -> list[StageResult]:
        """Results resolved since the last call (a stage plus the upstreams it pulled in)."""
        fresh, self._fresh = self._fresh, []
        return fresh

    def resolve(self, name: str) -> StageResult:
        if not self.announced:  # what a rehearsal replaced, before anything runs
            self.announced = True
            for line in self.experiment.rewrite.lines() if self.experiment.rewrite else ():
                self.progress(f"[{self.experiment.name}] {line}")
        if not self.started and self.executor is not None:
            self.submit_ahead()
        if name not in self.results:
            self.results[name] = self._settle(self.experiment.stages[name])
        self._tell(name)
        return self.results[name]

    def _tell(self, name: str) -> None:
        """Count a result as fresh once, after those of its upstreams (a cluster worker has
        only the results of the stage's own upstreams)."""
        if name in self._told or name not in self.results:
            return
        for upstream in self.experiment.stages[name].needs.values():
            self._tell(upstream)
        self._told.add(name)
        self._fresh.append(self.results[name])

    def _settle(self, spec: StageSpec, run_here: bool = True) -> StageResult | None:
        """The stage's result: skipped after an unfinished upstream, reused, waited for from
        the executor, or run here; None when it is to run and `run_here` is false."""
        blocked = self._blocked(spec)
        if blocked:
            result = self._unfinished(spec, Status.SKIPPED, blocked)
        elif spec.name in self._submitted:
            try:
                result = self._here(self.executor.wait(self._submitted[spec.name]))
            except Exception as exc:  # the task itself was lost: its node died past the retries
                result = self._unfinished(spec, Status.FAILED, f"{type(exc).__name__}: {exc}", error=exc)
        else:
            try:
                result = self._resolve(spec, run_here)
            except Exception as exc:  # computing the key failed, e.g. an input vanished
                result = self._unfinished(spec, Status.FAILED, f"{type(exc).__name__}: {exc}", error=exc)
            if result is None:
                return None
        finished = result.status in (Status.RAN, Status.REUSED)
        result.gates = [evaluate(g, result.metrics) for g in spec.gates] if finished else []
        result.gates_required = self.experiment.rewrite is None
        return result

    def submit_ahead(self) -> int:
        """Hand every stage that is to run to the executor, in dependency order, each with its
        upstreams' results or handles (small: keys, directories, metrics; never payloads), so
        that independent stages run at the same time. A stage whose upstreams are settled here
        and whose key is in the store is reused, never submitted. Returns how many were."""
        self.started = True
        for name, spec in self.experiment.stages.items():
            if not any(up in self._submitted for up in spec.needs.values()):
                result = self._settle(spec, run_here=False)
                if result is not None:
                    self.results[name] = result
                    continue
            upstream = [
                self._submitted[up] if up in self._submitted else self.results[up]
                for up in spec.needs.values()
            ]
            self._submitted[name] = self.executor.submit(self._task(spec), upstream, spec.resources)
        self._fresh, self._told = [], set()  # each item reports its own stage, as without executor
        return len(self._submitted)

    def _task(self, spec: StageSpec) -> StageTask:
        return StageTask(
            self.experiment, self.runs_dir, self.rerun, spec.name, self._prepare(spec), self.remote
        )

    def _store(self, stage: str) -> StageStore:
        return StageStore(
            self.runs_dir, self.experiment.name, self.experiment.profile_dir, stage, self.remote
        )

    def _here(self, result: StageResult) -> StageResult:
        """A result computed on another machine, with its directory in this machine's copy of
        the remote store (fetched now); unchanged on a shared filesystem."""
        if self.remote is not None and result.key and result.status in (Status.RAN, Status.REUSED):
            record = self._store(result.stage).lookup(result.key)
            if record is None:
                raise StageError(f"stage {result.stage!r} key {result.key} is missing from {self.remote.url}")
            result.dir = record.dir
        return result

    def _blocked(self, spec: StageSpec) -> str | None:
        for upstream in spec.needs.values():
            result = self.resolve(upstream)
            if result.status == Status.FAILED:
                return f"upstream stage {upstream!r} failed: {result.reason}"
            if result.status == Status.SKIPPED:
                return result.reason
            if result.abort:
                return f"upstream stage {upstream!r} aborted: {result.abort.describe()}"
        return None

    def _seed(self, spec: StageSpec) -> int:
        return self.experiment.seed if spec.seed is None else spec.seed

    def _prepare(self, spec: StageSpec) -> tuple[dict[str, Any], dict[str, str]]:
        """What the key and manifest take from this machine's checkout and models: the recipe
        with the fingerprint, and the code files of the kind. Computed where the spec was
        collected: a cluster worker gets them with the task."""
        if spec.name not in self._prepared:
            recipe = stage_recipe(spec, self.experiment)
            if spec.kind.fingerprint:
                recipe["fingerprint"] = spec.kind.fingerprint(spec.params)
            self._prepared[spec.name] = (recipe, closure_of(spec.kind.module))
        return self._prepared[spec.name]

    def _material(self, spec: StageSpec) -> dict[str, Any]:
        """Everything the cache key is made of: the recipe, the fingerprint of what the stage
        loads on this machine, and the keys and output digests of its upstream stages."""
        recipe = json.loads(json.dumps(self._prepare(spec)[0]))
        recipe["upstream"] = {
            role: {"stage": name, "key": self.results[name].key, "digest": self.results[name].digest}
            for role, name in recipe["upstream"].items()
        }
        return recipe

    def _resolve(self, spec: StageSpec, run_here: bool = True) -> StageResult | None:
        store = self._store(spec.name)
        material = self._material(spec)
        key = stage_key(**material)
        forced = self.forced(spec)
        record = None if forced else store.lookup(key)
        if record is None:
            if not run_here:
                return None
            with store.lock(key, waiting=lambda lease: self._waiting(spec, lease)):
                record = None if forced else store.lookup(key)  # another worker may have made it
                if record is None:
                    return self._run(spec, store, key, material)
        ran_at = record.manifest.get("finished_at", "?")
        return self._result(spec, Status.REUSED, f"cache hit, ran {ran_at}", record)

    def forced(self, spec: StageSpec) -> bool:
        """`--rerun` names the stage, `all`, or its matrix (`--rerun em`: each stage `em[...]`)."""
        return bool({"all", spec.name, spec.name.partition("[")[0]} & self.rerun)

    def why_to_run(self, spec: StageSpec) -> str:
        """Why the stage runs, its upstreams settled: `--rerun`, or what changed since its last run."""
        if self.forced(spec):
            return "forced by --rerun"
        material = self._material(spec)
        code = self._prepare(spec)[1]
        return why_run(self._store(spec.name).latest(), material, stage_key(**material), code)

    def _waiting(self, spec: StageSpec, lease: Mapping[str, Any]) -> None:
        holder = lease.get("holder", "another machine")
        self.progress(f"[{self.experiment.name}::{spec.name}] waiting: {holder} is running it")

    def _unfinished(self, spec: StageSpec, status: Status, reason: str, **extra: Any) -> StageResult:
        """A skipped or failed stage: no record in the store."""
        return StageResult(self.experiment.name, spec.name, spec.kind.name, status, reason, **extra)

    def _result(
        self, spec: StageSpec, status: Status, reason: str, record: Record, duration: float = 0.0
    ) -> StageResult:
        return StageResult(
            self.experiment.name,
            spec.name,
            spec.kind.name,
            status,
            reason,
            key=record.manifest["key"],
            dir=record.dir,
            digest=record.digest,
            metrics=record.metrics,
            duration_s=duration,
        )

    def _run(self, spec: StageSpec, store: StageStore, key: str, material: dict) -> StageResult:
        code = self._prepare(spec)[1]
        reason = self.why_to_run(spec)
        out = store.begin(key)
        scratch = store.scratch_dir(key)
        scratch.mkdir(parents=True, exist_ok=True)
        label = f"{self.experiment.name}::{spec.name}"

        def log(message: str) -> None:
            with (out / "stage.log").open("a", encoding="utf-8") as f:
                f.write(message + "\n")
            self.progress(f"[{label}] {message}")

        ctx = StageContext(
            experiment=self.experiment.name,
            stage=spec.name,
            params=with_inputs(spec),
            seed=self._seed(spec),
            out_dir=out,
            scratch_dir=scratch,
            upstream={
                role: Upstream(
                    name, self.results[name].kind, self.results[name].dir, self.results[name].metrics
                )
                for role, name in spec.needs.items()
            },
            spec_file=self.experiment.file,
            profile=self.experiment.profile,
            log=log,
        )
        self.progress(f"[{label}] running ({reason})")
        started = datetime.now(timezone.utc)
        clock = time.perf_counter()
        try:
            seed_everything(self._seed(spec))
            with running_stage(log) as running:  # a fixture built for it is not its duration
                metrics = checked_metrics(spec.name, spec.kind, spec.params, spec.kind.run(ctx))
            unwritten = spec.kind.missing_files(out)
            if unwritten:  # a run is complete with every file its kind declares, or not stored
                raise StageError(
                    f"stage {spec.name!r} ({spec.kind.name}) finished without writing "
                    f"{', '.join(unwritten)}, which its kind declares (x-files of its schema)"
                )
        except Exception as exc:
            kept = store.abandon(out, key)
            summary = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            reason = f"{type(exc).__name__}: {summary} (partial outputs kept in {kept})"
            return self._unfinished(
                spec, Status.FAILED, reason, key=key, duration_s=time.perf_counter() - clock, error=exc
            )
        except BaseException:
            store.abandon(out, key)
            raise
        duration = time.perf_counter() - clock - running.set_aside
        manifest = {
            "experiment": self.experiment.name,
            "profile": self.experiment.profile,
            "stage": spec.name,
            "spec_file": str(self.experiment.file),
            "params": spec.params,
            "key_material": material,
            "code": code,  # the files behind material["code_version"]
            "upstream": {role: up["key"] for role, up in material["upstream"].items()},
            "inputs": {name: str(path) for name, path in spec.inputs.items()},
            "seed": self._seed(spec),
            "reason": reason,
            "started_at": started.isoformat(timespec="seconds"),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "duration_s": round(duration, 3),
            "packages": package_versions(),
            "git": git_commit(self.experiment.file.parent),
        }
        record = store.commit(out, key, manifest, metrics)
        self.progress(f"[{label}] done in {duration:.1f}s")
        return self._result(spec, Status.RAN, reason, record, duration)


@dataclass(frozen=True)
class StageTask:
    """One stage resolved away from the pytest process (a cluster worker): the experiment,
    the store and what `_prepare` computed; its upstreams' results come as arguments."""

    experiment: Experiment
    runs_dir: Path
    rerun: frozenset[str]
    stage: str
    prepared: tuple[dict[str, Any], dict[str, str]]
    remote: RemoteStore | None = None

    def __call__(self, *upstream: StageResult) -> StageResult:
        runs_dir = self.remote.local_root() if self.remote else self.runs_dir  # this machine's copy
        run = ExperimentRun(self.experiment, runs_dir, self.rerun, progress=_print_line, remote=self.remote)
        run.results = {result.stage: run._here(result) for result in upstream}
        run._prepared[self.stage] = self.prepared
        return run.resolve(self.stage)


def _print_line(line: str) -> None:
    print(line, flush=True)  # a cluster worker's stdout reaches the driver's terminal


class Executor(Protocol):
    """Where stages run (harness.core.executors): `submit` returns a handle, `wait` its result."""

    def submit(self, task: StageTask, upstream: list[Any], resources: Mapping[str, float]) -> Any: ...

    def wait(self, handle: Any) -> StageResult: ...


def stage_recipe(spec: StageSpec, experiment: Experiment) -> dict[str, Any]:
    """What decides a stage's result, short of what runs before it: kind, code version,
    params (without transport settings), seed, input contents and the stages it needs by
    role. The same on every machine: the pre-registration lock holds it."""
    return {
        "kind": spec.kind.name,
        "code_version": spec.kind.version_for(spec.params, experiment.file.parent),
        "params": without(spec.params, spec.kind.transport_params),
        "seed": experiment.seed if spec.seed is None else spec.seed,
        "upstream": dict(sorted(spec.needs.items())),
        "inputs": {name: file_digest(path) for name, path in sorted(spec.inputs.items())},
    }


def recipe_of(material: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe inside a stored key material (a manifest's `key_material`)."""
    recipe = {k: v for k, v in material.items() if k != "fingerprint"}
    recipe["upstream"] = {role: up["stage"] for role, up in material.get("upstream", {}).items()}
    return recipe


def with_inputs(spec: StageSpec) -> dict[str, Any]:
    """A copy of the params with input paths made absolute."""
    params = json.loads(json.dumps(spec.params))
    for dotted, path in spec.inputs.items():
        name, _, sub = dotted.partition(".")
        if not sub:
            params[name] = str(path)
        elif isinstance(params[name], dict):
            params[name][sub] = str(path)
        else:
            params[name][int(sub)] = str(path)
    return params


def checked_metrics(stage: str, kind: StageKind, params: Mapping[str, Any], metrics: Any) -> dict[str, Any]:
    """Hold a run function to the contract: a mapping of JSON values with the declared names."""
    if not isinstance(metrics, Mapping):
        raise StageError(f"stage {stage!r} returned {type(metrics).__name__}, not a mapping of metrics")
    clean = {str(k): _json_value(v, f"{stage}.{k}") for k, v in metrics.items()}
    missing = sorted(kind.produces(params) - set(clean))
    if missing:
        raise StageError(f"stage {stage!r} did not return the metrics it declares: {', '.join(missing)}")
    return clean


def _json_value(value: Any, where: str) -> Any:
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else value  # NaN is no measurement; gates say so
    if isinstance(value, Mapping):
        return {str(k): _json_value(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v, where) for v in value]
    raise StageError(f"metric {where} is a {type(value).__name__}, not a JSON value")


def why_run(
    latest: Mapping[str, Any] | None,
    material: Mapping[str, Any],
    key: str,
    code: Mapping[str, str] | None = None,
) -> str:
    """Say what changed since the last complete run of this stage (`code`: the files of the
    kind's code version now, named when the manifest has them too)."""
    if latest is None:
        return "new"
    before = latest.get("key_material", {})
    if latest.get("key") == key:
        return "previous run incomplete"
    changes = []
    if before.get("kind") != material["kind"] or before.get("code_version") != material["code_version"]:
        was = latest.get("code")
        edited = changed_paths(was, dict(code)) if isinstance(was, dict) and code else []
        shown = ", ".join(edited[:5]) + (f" and {len(edited) - 5} more" if len(edited) > 5 else "")
        changes.append("code version changed" + (f": {shown}" if edited else ""))
    if before.get("fingerprint") != material.get("fingerprint"):
        changes.append("base model changed")
    params = changed_paths(before.get("params"), material["params"])
    if params:
        changes.append("params changed: " + ", ".join(params))
    if before.get("seed") != material["seed"]:
        changes.append("seed changed")
    upstream = sorted(
        {path.split(".")[0] for path in changed_paths(before.get("upstream", {}), material["upstream"])}
    )
    if upstream:
        changes.append("upstream changed: " + ", ".join(upstream))
    inputs = changed_paths(before.get("inputs"), material["inputs"])
    if inputs:
        changes.append("inputs changed: " + ", ".join(inputs))
    return "; ".join(changes) or "key changed"


def changed_paths(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted paths at which two values (nested dicts) differ; "(all)" for two unequal non-dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += changed_paths(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [prefix or "(all)"]
