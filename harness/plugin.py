"""pytest hooks: options, spec collection, stage reports, the harness summary."""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any

import pytest
import yaml
from _pytest.main import wrap_session
from _pytest.reports import CollectReport

from harness import hookspecs
from harness.collect import (
    EXECUTOR,
    PROGRESS_REPORT,
    RUNNING_ITEM,
    ExperimentFile,
    HypothesisItem,
    LockItem,
    StageItem,
    progress_writer,
    runs_dir,
    runs_location,
)
from harness.core import registry
from harness.core.executors import EXECUTORS, ExecutorError, make_executor
from harness.core.plan import plan_lines, plan_run
from harness.core.preflight import report
from harness.core.remote_store import RemoteStoreError
from harness.core.store_clean import clean_store
from harness.rehearsal import DEFAULT_SCALE, prepare_environment
from harness.report import trackers
from harness.report.runs import RunReports

_HOOKED_KINDS = pytest.StashKey[list]()  # the kinds pytest_harness_stage_kinds gave this session


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup(
        "harness",
        "experiment harness (ini: harness_*; HARNESS_CACHE_DIR: tiny worlds, LLM response cache, "
        "default ~/.cache/harness)",
    )
    group.addoption(
        "--profile",
        dest="harness_profile",
        metavar="NAME",
        default=None,
        help="apply the spec's profile NAME (e.g. tiny) over the spec",
    )
    group.addoption(
        "--runs-dir",
        dest="harness_runs_dir",
        metavar="DIR|URL",
        default=None,
        help="artifact store: a directory, or an fsspec URL such as s3://bucket/runs that each machine "
        "copies into $HARNESS_CACHE_DIR/stores (default: ini harness_runs_dir, or runs/)",
    )
    group.addoption(
        "--rerun",
        dest="harness_rerun",
        metavar="STAGE",
        action="append",
        default=[],
        help="run STAGE again even if its artifacts are cached; 'all' for every stage, a matrix's name for "
        "each of its stages",
    )
    group.addoption(
        "--plan",
        dest="harness_plan",
        action="store_true",
        default=False,
        help="print, for every collected stage, whether it would be reused or run and why, and what the "
        "stages that would run ask of paid APIs (requests, tokens, cost); runs nothing",
    )
    group.addoption(
        "--rehearse",
        dest="harness_rehearse",
        action="store_true",
        default=False,
        help="rehearse the profile on CPU: base models replaced by random stand-ins of their family, API "
        "providers by a scripted local server, sizes scaled by --rehearse-scale; every stage runs, gates "
        "and hypotheses are reported, not required; stored apart (<profile>.rehearsal)",
    )
    group.addoption(
        "--rehearse-scale",
        dest="harness_rehearse_scale",
        metavar="FACTOR",
        type=float,
        default=DEFAULT_SCALE,
        help=f"with --rehearse: the factor on the sizes a kind marks (documents, samples, epochs; "
        f"default {DEFAULT_SCALE})",
    )
    group.addoption(
        "--lock-hypotheses",
        dest="harness_lock_hypotheses",
        action="store_true",
        default=False,
        help="record a hash of each collected spec's hypotheses and analysis plan (for --profile) in "
        "<spec>.lock.json beside it, with the time and git commit; runs no stage",
    )
    group.addoption(
        "--relock",
        dest="harness_relock",
        action="store_true",
        default=False,
        help="with --lock-hypotheses: replace a lock whose plan differs (the lock keeps a record of it)",
    )
    group.addoption(
        "--harness-clean",
        dest="harness_clean",
        action="store_true",
        default=False,
        help="remove from the runs directory what killed runs left (temporary and replaced outputs, "
        "scratch of completed keys, dangling LATEST files) and exit; runs no test",
    )
    group.addoption(
        "--executor",
        dest="harness_executor",
        choices=EXECUTORS,
        default=None,
        help="where stages run: local (in this process, the default), ray (as Ray tasks on a cluster; "
        "independent stages at the same time) or submitit (as Slurm jobs, or local processes without Slurm)",
    )
    group.addoption(
        "--ray-address",
        dest="harness_ray_address",
        metavar="ADDRESS",
        default=None,
        help="with --executor ray: the cluster to join (default: ini harness_ray_address, RAY_ADDRESS, "
        "else a Ray instance on this machine)",
    )
    group.addoption(
        "--max-retries",
        dest="harness_max_retries",
        metavar="N",
        type=int,
        default=None,
        help="with --executor ray: times a stage is run again when its node or worker dies (default 3)",
    )
    group.addoption(
        "--submitit-param",
        dest="harness_submitit_params",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="with --executor submitit: a parameter of submitit's AutoExecutor for every job (repeatable), "
        "e.g. slurm_partition=gpu, timeout_min=600; a stage's resources give gpus, cpus and memory",
    )
    group.addoption(
        "--track",
        dest="harness_trackers",
        metavar="TRACKER",
        action="append",
        default=[],
        help="at the end of the session, export each run's params, metrics and plots to TRACKER: wandb or "
        "mlflow (repeatable; pip install -e '.[trackers]'; their usual WANDB_*, MLFLOW_* settings apply)",
    )
    parser.addini(
        "harness_runs_dir",
        "the artifact store (--runs-dir): a directory, relative to the ini file, or an fsspec URL "
        "(default: runs)",
        default="runs",
    )
    parser.addini(
        "harness_executor",
        "where stages run (--executor): local, ray or submitit (default: local)",
        default="local",
    )
    parser.addini(
        "harness_submitit_params",
        "KEY=VALUE parameters of every --executor submitit job, e.g. slurm_partition=gpu "
        "(--submitit-param adds to and overrides them)",
        type="args",
    )
    parser.addini(
        "harness_ray_address",
        "the Ray cluster --executor ray joins (--ray-address; default: RAY_ADDRESS, else a local Ray)",
        default="",
    )
    parser.addini(
        "harness_max_retries",
        "times --executor ray runs a stage again when its node or worker dies (--max-retries; default: 3)",
        default="3",
    )
    parser.addini(
        "harness_experiments",
        "globs of the experiment specs collected when a directory is given (a YAML file named on the "
        "command line is always collected)",
        type="args",
        default=["experiments/*.yaml", "experiments/*.yml"],
    )
    parser.addini(
        "harness_trackers",
        "trackers every run is exported to (--track): wandb, mlflow (default: none)",
        type="args",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("harness_relock") and not config.getoption("harness_lock_hypotheses"):
        raise pytest.UsageError("--relock only goes with --lock-hypotheses")
    if config.getoption("harness_rehearse"):
        if config.getoption("harness_lock_hypotheses"):
            raise pytest.UsageError("--lock-hypotheses locks the real plan: run it without --rehearse")
        if not 0 < config.getoption("harness_rehearse_scale") <= 1:
            raise pytest.UsageError("--rehearse-scale takes a factor in (0, 1], e.g. 0.1")
        prepare_environment()
    config.pluginmanager.register(_ReportHooks(config), "harness-reports")
    if config.getoption("harness_plan") and getattr(config.option, "dist", "no") != "no":
        config.option.dist = "no"  # the plan is this process's: no xdist worker runs a stage
    config.stash[EXECUTOR] = _executor(config)
    _share_cores()
    config.stash[_HOOKED_KINDS] = []
    config.hook.pytest_harness_stage_kinds.call_historic(
        result_callback=lambda kinds: config.stash[_HOOKED_KINDS].extend(map(registry.register, kinds))
    )


def _executor(config: pytest.Config):
    name = config.getoption("harness_executor") or config.getini("harness_executor")
    if name not in EXECUTORS:
        raise pytest.UsageError(f"harness_executor = {name!r}: choose one of {', '.join(EXECUTORS)}")
    retries = config.getoption("harness_max_retries")
    address = config.getoption("harness_ray_address") or config.getini("harness_ray_address") or None
    local, remote = runs_location(config)
    try:
        if remote is not None:
            remote.check()
        return make_executor(
            name,
            address,
            int(config.getini("harness_max_retries")) if retries is None else retries,
            local,
            shared_by_url=remote is not None,
            submitit_parameters=_submitit_parameters(config),
        )
    except (ExecutorError, RemoteStoreError) as exc:
        raise pytest.UsageError(str(exc)) from None


def _submitit_parameters(config: pytest.Config) -> dict[str, Any]:
    """`KEY=VALUE` pairs of the ini and the command line (which wins), values read as YAML."""
    parameters = {}
    for pair in [*config.getini("harness_submitit_params"), *config.getoption("harness_submitit_params")]:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise pytest.UsageError(f"--submitit-param {pair!r}: write KEY=VALUE, e.g. slurm_partition=gpu")
        parameters[key.strip()] = yaml.safe_load(value)
    return parameters


@pytest.hookimpl(tryfirst=True)  # before an xdist worker sends the controller its items
def pytest_collection_finish(session: pytest.Session) -> None:
    """A cluster executor gets every stage that is to run now, so that independent stages run
    at the same time. An xdist worker leaves it to the first item of each experiment: it runs
    only the experiments its controller gives it."""
    config = session.config
    mistake = _unknown_rerun(session)
    lacks = None if config.getoption("harness_plan") else _lacks(session)  # the plan shows them
    if mistake or lacks:
        _collection_error(session, "\n\n".join(m for m in (mistake, lacks) if m))
        return
    if hasattr(config, "workerinput") or config.getoption("collectonly") or config.getoption("harness_plan"):
        return
    runs = {id(item.run): item.run for item in session.items if isinstance(item, (StageItem, HypothesisItem))}
    executor = session.config.stash[EXECUTOR]
    try:
        submitted = executor.start(runs.values())
    except ExecutorError as exc:
        raise pytest.UsageError(str(exc)) from None
    terminal = session.config.pluginmanager.get_plugin("terminalreporter")
    if executor.name != "local" and terminal is not None:
        terminal.write_line(f"harness executor {executor.name}: submitted {submitted} stages")


def _unknown_rerun(session: pytest.Session) -> str | None:
    """What is wrong with a `--rerun` name that is no stage, matrix (`em` for `em[...]`) nor `all`."""
    stages = {
        name for item in session.items if isinstance(item, StageItem) for name in item.run.experiment.stages
    }
    known = {"all"} | stages | {name.partition("[")[0] for name in stages}
    for name in session.config.getoption("harness_rerun"):
        if name not in known and stages:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
            return (
                f"--rerun {name}: no such stage{hint}. The collected experiments' stages: "
                f"{', '.join(sorted(stages))} (or `all`, or a matrix's name)"
            )
    return None


def _collection_error(session: pytest.Session, message: str) -> None:
    """Stop the session as a spec error does: an error of collection, with no item left to run
    (an xdist worker sends it to the controller, which shows it)."""
    report = CollectReport(nodeid="", outcome="failed", longrepr=message, result=[])
    session.ihook.pytest_collectreport(report=report)
    session.ihook.pytest_deselected(items=list(session.items))
    session.items.clear()


def _lacks(session: pytest.Session) -> str | None:
    """Every API key and base model the collected stages need and this machine lacks, in one
    message (harness.core.preflight); None when nothing is missing."""
    return report(m for item in session.items if isinstance(item, StageItem) for m in item.spec.missing)


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> bool | None:
    """`--plan`: print what each collected experiment would reuse and run, and run nothing."""
    if not session.config.getoption("harness_plan") or session.testsfailed:  # collection errors stop it
        return None
    runs = {id(item.run): item.run for item in session.items if isinstance(item, (StageItem, HypothesisItem))}
    planned = [stage for run in runs.values() for stage in plan_run(run)]
    terminal = session.config.pluginmanager.get_plugin("terminalreporter")
    if terminal is not None:
        terminal.section("harness plan")
        for line in plan_lines(planned):
            terminal.write_line(line)
        lacks = _lacks(session)
        if lacks:
            terminal.section("harness: a run would stop here")
            terminal.write_line(lacks)
    return True


def pytest_unconfigure(config: pytest.Config) -> None:
    """A conftest's kinds are this session's: another session in the process (pytester) has its own."""
    executor = config.stash.get(EXECUTOR, None)
    if executor is not None:
        executor.close()  # cancels what no item waited for: Ctrl-C, -x
    for kind in config.stash.get(_HOOKED_KINDS, []):
        registry.unregister(kind)


def _share_cores() -> None:
    """Under xdist, give each worker its share of the cores: torch's default of one thread
    per core in every worker oversubscribes them, and small models then run many times
    slower as threads wait for each other."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers or "OMP_NUM_THREADS" in os.environ:
        return
    threads = max(1, (os.cpu_count() or 1) // int(workers))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def pytest_cmdline_main(config: pytest.Config) -> int | None:
    if config.getoption("harness_clean"):
        return wrap_session(config, _clean)
    return None


def _clean(config: pytest.Config, session: pytest.Session) -> int:
    directory = runs_dir(config)
    cleaning = clean_store(directory)
    terminal = config.get_terminal_writer()
    terminal.sep("-", f"harness clean: {directory}")
    terminal.line(f"removed {len(cleaning.removed)} leftovers of killed runs")
    for path in cleaning.removed:
        terminal.line(f"  {path.relative_to(directory)}")
    if cleaning.kept:
        terminal.line(
            f"kept {len(cleaning.kept)} resume scratch / failed attempts of keys that never completed "
            "(the next run of the key resumes from them; delete them by hand to start afresh):"
        )
        for path in cleaning.kept:
            terminal.line(f"  {path.relative_to(directory)}")
    if cleaning.busy:
        terminal.line(f"left {len(cleaning.busy)} working directories of stages running now")
    return 0


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    if file_path.suffix not in (".yaml", ".yml"):
        return None
    globs = parent.config.getini("harness_experiments")
    if parent.session.isinitpath(file_path) or any(PurePath(file_path).match(g) for g in globs):
        return ExperimentFile.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under --lock-hypotheses only the lock items run: no stage, no other test."""
    if not config.getoption("harness_lock_hypotheses"):
        return
    deselected = [item for item in items if not isinstance(item, LockItem)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if isinstance(item, LockItem)]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Remember the running item: an xdist worker sends its progress lines as its reports."""
    item.config.stash[RUNNING_ITEM] = item
    try:
        return (yield)
    finally:
        del item.config.stash[RUNNING_ITEM]


@pytest.hookimpl(tryfirst=True)
def pytest_report_teststatus(report: pytest.TestReport) -> tuple[str, str, str] | None:
    """A progress line from an xdist worker is no outcome: no letter, no count."""
    return ("", "", "") if getattr(report, "when", None) == PROGRESS_REPORT else None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if call.when == "call":
        if isinstance(item, (StageItem, HypothesisItem)):
            report.harness = item.payload()
        elif isinstance(item, LockItem) and item.done:
            report.harness_lock = item.done
    return report


class _ReportHooks:
    """Gathers stage results from reports (including xdist workers') and writes run reports."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.reports = RunReports()
        self.locks: list[dict] = []
        try:
            self.trackers = trackers.checked(
                [*config.getini("harness_trackers"), *config.getoption("harness_trackers")]
            )
        except trackers.TrackerError as exc:
            raise pytest.UsageError(str(exc)) from None
        self.exported: list[str] = []
        self.write_progress: Callable[[str], None] | None = None  # made once the terminal is there

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        line = getattr(report, "harness_progress", None)
        if line and not hasattr(self.config, "workerinput"):  # an xdist worker's, on the controller
            self.write_progress = self.write_progress or progress_writer(self.config)
            self.write_progress(line)
        payload = getattr(report, "harness", None)
        if payload:
            self.reports.add(payload)
        lock = getattr(report, "harness_lock", None)
        if lock:
            self.locks.append(lock)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if not hasattr(self.config, "workerinput"):  # xdist workers leave it to the controller
            self.reports.write()
            if self.trackers:
                self.exported = trackers.export(
                    [run.dir for run in self.reports.runs.values()], self.trackers
                )

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.reports.runs:
            terminalreporter.section("harness gates")
            for line in self.reports.summary_lines():
                terminalreporter.write_line(line)
        if self.exported:
            terminalreporter.section("harness trackers")
            for line in self.exported:
                terminalreporter.write_line(line)
        hypotheses = self.reports.hypothesis_lines()
        if hypotheses:
            terminalreporter.section("harness hypotheses")
            for line in hypotheses:
                terminalreporter.write_line(line)
        if self.locks:
            terminalreporter.section("harness hypotheses locked")
            for lock in self.locks:
                terminalreporter.write_line(
                    f"{lock['experiment']} [{lock['profile']}]: {lock['what']} -> {lock['lock_file']}"
                )
                terminalreporter.write_line(f"  {', '.join(lock['hypotheses'])}  sha256 {lock['hash'][:16]}")
                if lock["existing"]:
                    terminalreporter.write_line(
                        f"  results that already exist stay exploratory: {', '.join(lock['existing'])}"
                    )
                terminalreporter.write_line("  commit the lock file before running: its commit dates it")
