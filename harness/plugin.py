"""pytest hooks: options, spec collection, stage reports, the harness summary."""

from __future__ import annotations

import os
import sys
from pathlib import Path, PurePath
from typing import Any

import pytest
import yaml
from _pytest.main import wrap_session

from harness import hookspecs
from harness.collect import (
    EXECUTOR,
    ExperimentFile,
    HypothesisItem,
    LockItem,
    StageItem,
    runs_dir,
    runs_location,
)
from harness.core import registry
from harness.core.executors import EXECUTORS, ExecutorError, make_executor
from harness.core.remote_store import RemoteStoreError
from harness.core.store_clean import clean_store
from harness.report.runs import RunReports

_HOOKED_KINDS = pytest.StashKey[list]()  # the kinds pytest_harness_stage_kinds gave this session


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("harness", "experiment harness")
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
    parser.addini(
        "harness_runs_dir", "artifact store directory or URL, relative to the ini file", default="runs"
    )
    parser.addini("harness_executor", "where stages run: local, ray or submitit", default="local")
    parser.addini(
        "harness_submitit_params", "KEY=VALUE parameters of --executor submitit's jobs", type="args"
    )
    parser.addini("harness_ray_address", "the Ray cluster of --executor ray", default="")
    parser.addini("harness_max_retries", "retries of a stage whose node dies (--executor ray)", default="3")
    parser.addini(
        "harness_experiments",
        "globs of experiment specs collected from directories",
        type="args",
        default=["experiments/*.yaml", "experiments/*.yml"],
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("harness_relock") and not config.getoption("harness_lock_hypotheses"):
        raise pytest.UsageError("--relock only goes with --lock-hypotheses")
    config.pluginmanager.register(_ReportHooks(config), "harness-reports")
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


def pytest_collection_finish(session: pytest.Session) -> None:
    """A cluster executor gets every stage that is to run now, so that independent stages run
    at the same time. An xdist worker leaves it to the first item of each experiment: it runs
    only the experiments its controller gives it."""
    if hasattr(session.config, "workerinput") or session.config.getoption("collectonly"):
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

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        payload = getattr(report, "harness", None)
        if payload:
            self.reports.add(payload)
        lock = getattr(report, "harness_lock", None)
        if lock:
            self.locks.append(lock)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if not hasattr(self.config, "workerinput"):  # xdist workers leave it to the controller
            self.reports.write()

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.reports.runs:
            terminalreporter.section("harness gates")
            for line in self.reports.summary_lines():
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
