"""pytest nodes: an experiment spec file, one item per stage, then one per hypothesis."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
from _pytest.outcomes import Skipped

from harness.core.execution import ExperimentRun, StageResult
from harness.core.experiment import Experiment, StageSpec, load_experiment, load_plan
from harness.core.outcomes import Outcome, Status
from harness.core.preflight import gathering
from harness.core.remote_store import RemoteStore, is_url
from harness.core.stage import StageError
from harness.hypotheses.evaluation import ERROR, Evaluation, HypothesisFamily
from harness.hypotheses.lock import HypothesisError, lock_basis, stored_keys, write_lock
from harness.rehearsal import Rehearsal
from harness.report.runs import spec_outline
from harness.spec.errors import SpecError, UnknownProfile

_PLUMBING = {
    Path(__file__).parent / name
    for name in ("collect.py", "core/execution.py", "hypotheses/evaluation.py", "hypotheses/lock.py")
}
LOCK_ITEM = "lock-hypotheses"
EXECUTOR = pytest.StashKey[object]()  # harness.core.executors: where stages run
RUNS = pytest.StashKey[tuple[Path, "RemoteStore | None"]]()  # see runs_location
RUNNING_ITEM = pytest.StashKey[pytest.Item]()  # the item in its runtest protocol (plugin.py)
PROGRESS_REPORT = "harness-progress"  # the `when` of a report carrying an xdist worker's progress line


class GateFailure(AssertionError):
    def __init__(self, result: StageResult, mark: Any):
        failed = result.failed_gates
        lines = [f"stage {result.stage!r} ({mark}): {len(failed)} of {len(result.gates)} gates failed"]
        lines += [f"  {g.describe()}" for g in failed]
        if result.abort:
            lines.append("  the stages that need this one are skipped (abort bound reached)")
        super().__init__("\n".join(lines))


class ExperimentFile(pytest.File):
    """A YAML spec; collecting it loads, merges and validates the experiment."""

    def collect(self):
        profile = self.config.getoption("harness_profile")
        if self.config.getoption("harness_lock_hypotheses"):  # record the plan, run nothing
            yield LockItem.from_parent(self, name=LOCK_ITEM, experiment=load_plan(self.path, profile))
            return
        try:
            with gathering():  # missing keys and models: the plugin reports every stage's at once
                experiment = load_experiment(self.path, profile, rewrite=rehearsal(self.config))
        except UnknownProfile as exc:
            if self.session.isinitpath(self.path):  # named on the command line: a mistake
                raise
            # found in a directory: e.g. a spec that runs only with real providers, under --profile tiny
            pytest.skip(f"{self.path.name}: {exc.problems[0].message}", allow_module_level=True)
        run = experiment_run(self.config, experiment)
        for name, spec in experiment.stages.items():
            yield StageItem.from_parent(self, name=name, spec=spec, run=run)
        plan = experiment.hypotheses
        if plan:  # after every stage: the family's correction needs all of their samples
            family = HypothesisFamily(
                plan,
                lock_basis(experiment),
                experiment.file,
                experiment.profile_dir,
                run.resolve,
                rehearsal=experiment.rewrite is not None,
            )
            for name in plan.tests:
                yield HypothesisItem.from_parent(self, name=name, family=family, run=run)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, SpecError):
            return str(excinfo.value)
        return super().repr_failure(excinfo)


def runs_location(config: pytest.Config) -> tuple[Path, RemoteStore | None]:
    """The runs directory on this machine, and the remote store it copies when the option or
    ini value is a URL (`s3://bucket/runs`: the copy is then under the harness cache)."""
    if RUNS not in config.stash:
        option = config.getoption("harness_runs_dir")
        setting = option or config.getini("harness_runs_dir")
        if is_url(setting):
            remote = RemoteStore(setting)
            config.stash[RUNS] = (remote.local_root(), remote)
        else:
            base = Path.cwd() if option else config.inipath.parent if config.inipath else config.rootpath
            config.stash[RUNS] = ((base / setting).resolve(), None)
    return config.stash[RUNS]


def rehearsal(config: pytest.Config) -> Rehearsal | None:
    """`--rehearse`: a new record of stand-ins for each experiment collected (harness.rehearsal)."""
    if not config.getoption("harness_rehearse"):
        return None
    return Rehearsal(config.getoption("harness_rehearse_scale"))


def runs_dir(config: pytest.Config) -> Path:
    return runs_location(config)[0]


def experiment_run(config: pytest.Config, experiment: Experiment) -> ExperimentRun:
    local, remote = runs_location(config)
    return ExperimentRun(
        experiment,
        local,
        rerun=frozenset(config.getoption("harness_rerun")),
        progress=progress_writer(config),
        executor=config.stash[EXECUTOR].for_run(),
        remote=remote,
    )


def progress_writer(config: pytest.Config) -> Callable[[str], None]:
    """Live progress lines on the terminal, past output capture; silent with -q. An xdist
    worker's terminal goes nowhere: there each line goes to the controller, which writes it
    (plugin.py), as a report of the running item, the one thing workers send as it happens."""
    terminal = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if terminal is None or config.get_verbosity() < 0:
        return lambda line: None
    if hasattr(config, "workerinput"):
        return lambda line: _send_to_controller(config, line)

    def write(line: str) -> None:
        with capture.global_and_fixture_disabled() if capture else nullcontext():
            terminal.write_line(line)

    return write


def _send_to_controller(config: pytest.Config, line: str) -> None:
    item = config.stash.get(RUNNING_ITEM, None)
    if item is not None:  # stages run only inside an item's runtest
        report = pytest.TestReport(
            item.nodeid, item.location, {}, "passed", None, PROGRESS_REPORT, harness_progress=line
        )
        config.hook.pytest_runtest_logreport(report=report)


class _HarnessItem(pytest.Item):
    """An item whose expected failures (`MESSAGES`) are shown as their message alone, and
    whose tracebacks leave out the harness's own plumbing."""

    MESSAGES: tuple[type[BaseException], ...] = ()

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, self.MESSAGES):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def _traceback_filter(self, excinfo):
        traceback = super()._traceback_filter(excinfo)
        return traceback.filter(lambda entry: Path(str(entry.path)) not in _PLUMBING)


class StageItem(_HarnessItem):
    MESSAGES = (GateFailure, StageError, SpecError)

    def __init__(self, *, spec: StageSpec, run: ExperimentRun, **kwargs: Any):
        super().__init__(**kwargs)
        self.spec = spec
        self.run = run
        self.fresh: list[StageResult] = []
        # --dist loadgroup keeps an experiment's stages, in order, on one worker
        self.add_marker(pytest.mark.xdist_group(str(run.experiment.file)))

    def payload(self) -> dict[str, Any]:
        return run_payload(self.run, self.fresh)

    def runtest(self) -> None:
        try:
            result = self.run.resolve(self.name)
        finally:
            self.fresh = self.run.take_fresh()
        for name, value in _scalar_metrics(result.metrics):
            self.user_properties.append((name, value))
        self.user_properties.append(("harness.status", result.status.value))
        if result.status == Status.SKIPPED:  # reported at the stage's line, like a skip marker
            raise Skipped(result.reason, _use_item_location=True)
        if result.status == Status.FAILED:
            raise result.error
        if result.failed_gates:
            raise GateFailure(result, self.spec.mark)

    def reportinfo(self):
        line = self.spec.mark.line - 1 if self.spec.mark else 0
        return self.path, line, f"{self.run.experiment.name}::{self.name} [{self.spec.kind.name}]"


def _scalar_metrics(metrics: dict[str, Any]):
    for name, value in metrics.items():
        if isinstance(value, dict):
            for part in ("value", "ci_low", "ci_high"):
                if isinstance(value.get(part), (int, float)):
                    yield (name if part == "value" else f"{name}.{part}"), value[part]
        elif isinstance(value, (int, float, str)) or value is None:
            yield name, value


def run_payload(run: ExperimentRun, results: list[StageResult]) -> dict[str, Any]:
    """What a report needs of an item's call, sent from xdist workers to the controller."""
    return {
        "runs_dir": str(run.runs_dir),
        "experiment": run.experiment.name,
        "profile": run.experiment.profile_dir,
        "spec_file": str(run.experiment.file),
        "outline": spec_outline(run.experiment),
        "results": [r.to_json() for r in results],
    }


class HypothesisItem(_HarnessItem):
    """One pre-registered hypothesis: passes when supported, fails when refuted, and follows
    the spec's policy when inconclusive. Skipped when a stage it reads did not finish."""

    MESSAGES = (HypothesisError,)

    def __init__(self, *, family: HypothesisFamily, run: ExperimentRun, **kwargs: Any):
        super().__init__(**kwargs)
        self.family = family
        self.hypothesis = family.plan.tests[self.name]
        self.run = run
        self.fresh: list[StageResult] = []
        self.evaluation: Evaluation | None = None
        self.add_marker(pytest.mark.xdist_group(str(run.experiment.file)))  # with its stages

    def runtest(self) -> None:
        try:
            self.evaluation = self.family.evaluate()[self.name]
        finally:
            self.fresh = self.run.take_fresh()
        evaluation, plan, registration = self.evaluation, self.family.plan, self.family.registration
        self.user_properties += [
            ("hypothesis.verdict", evaluation.verdict),
            ("hypothesis.status", registration.status),
        ]
        if evaluation.result is not None:
            self.user_properties += [
                ("hypothesis.effect", evaluation.result.effect),
                ("hypothesis.p_value", evaluation.result.p_value),
                ("hypothesis.p_adjusted", evaluation.p_adjusted),
            ]
        outcome = evaluation.outcome(plan)
        if evaluation.verdict == ERROR:  # its samples are missing or unusable
            raise HypothesisError(f"hypothesis {self.name} ({self.hypothesis.where}): {evaluation.why}")
        if outcome == Outcome.SKIPPED:  # untested (a stage did not finish), or inconclusive under `skip`
            raise Skipped(evaluation.summary(registration), _use_item_location=True)
        if outcome == Outcome.FAILED:
            raise HypothesisError(evaluation.describe(registration))

    def payload(self) -> dict[str, Any]:
        family = self.family
        rows = []
        if self.evaluation is not None:
            index = list(family.plan.tests).index(self.name)
            rows.append(self.evaluation.to_json(family.plan, family.registration, index))
        return {
            **run_payload(self.run, self.fresh),
            "hypotheses": {
                "plan": family.plan.as_json(),
                "hash": family.basis.digest,
                "registration": family.registration.as_json(),
                "results": rows,
            },
        }

    def reportinfo(self):
        mark = self.hypothesis.mark
        return (
            self.path,
            (mark.line - 1 if mark else 0),
            f"{self.run.experiment.name}::{self.name} [hypothesis]",
        )


class LockItem(_HarnessItem):
    """`--lock-hypotheses`: records the hash of the experiment's analysis beside the spec."""

    MESSAGES = (HypothesisError,)

    def __init__(self, *, experiment: Experiment, **kwargs: Any):
        super().__init__(**kwargs)
        self.experiment = experiment
        self.plan = experiment.hypotheses
        self.profile = experiment.profile_dir
        self.done: dict[str, Any] | None = None

    def runtest(self) -> None:
        experiment, file = self.experiment, self.experiment.file
        if self.plan is None:
            raise Skipped(f"{file.name} has no `hypotheses:` section to lock", _use_item_location=True)
        basis = lock_basis(experiment)
        local, remote = runs_location(self.config)
        existing = stored_keys(basis, local, experiment, remote)
        path, what = write_lock(basis, file, self.profile, existing, self.config.getoption("harness_relock"))
        self.done = {
            "experiment": experiment.name,
            "profile": self.profile,
            "lock_file": str(path),
            "hash": basis.digest,
            "hypotheses": list(self.plan.tests),
            "existing": sorted(stage for stage, keys in existing.items() if keys),
            "what": what,
        }

    def reportinfo(self):
        line = self.plan.mark.line - 1 if self.plan and self.plan.mark else 0
        return self.path, line, f"{self.experiment.name}::{self.name}"
