"""pytest nodes: an experiment spec file and one item per stage."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
from _pytest.outcomes import Skipped

from harness.execution import FAILED, SKIPPED, ExperimentRun, StageResult
from harness.experiment import Experiment, StageSpec, load_experiment
from harness.spec.errors import SpecError
from harness.stage import StageError

_PLUMBING = {Path(__file__).parent / name for name in ("collect.py", "execution.py")}


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
        experiment = load_experiment(self.path, self.config.getoption("harness_profile"))
        run = experiment_run(self.config, experiment)
        for name, spec in experiment.stages.items():
            yield StageItem.from_parent(self, name=name, spec=spec, run=run)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, SpecError):
            return str(excinfo.value)
        return super().repr_failure(excinfo)


def runs_dir(config: pytest.Config) -> Path:
    option = config.getoption("harness_runs_dir")
    if option:
        return Path(option).resolve()
    base = config.inipath.parent if config.inipath else config.rootpath
    return (base / config.getini("harness_runs_dir")).resolve()


def experiment_run(config: pytest.Config, experiment: Experiment) -> ExperimentRun:
    return ExperimentRun(
        experiment,
        runs_dir(config),
        rerun=frozenset(config.getoption("harness_rerun")),
        progress=_progress_writer(config),
    )


def _progress_writer(config: pytest.Config):
    """Live progress lines on the terminal, past output capture; silent with -q."""
    terminal = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if terminal is None or config.get_verbosity() < 0:
        return lambda line: None

    def write(line: str) -> None:
        with capture.global_and_fixture_disabled() if capture else nullcontext():
            terminal.write_line(line)

    return write


class StageItem(pytest.Item):
    def __init__(self, *, spec: StageSpec, run: ExperimentRun, **kwargs: Any):
        super().__init__(**kwargs)
        self.spec = spec
        self.run = run
        self.fresh: list[StageResult] = []
        # --dist loadgroup keeps an experiment's stages, in order, on one worker
        self.add_marker(pytest.mark.xdist_group(str(run.experiment.file)))

    def runtest(self) -> None:
        try:
            result = self.run.resolve(self.name)
        finally:
            self.fresh = self.run.take_fresh()
        for name, value in _scalar_metrics(result.metrics):
            self.user_properties.append((name, value))
        self.user_properties.append(("harness.status", result.status))
        if result.status == SKIPPED:  # reported at the stage's line, like a skip marker
            raise Skipped(result.reason, _use_item_location=True)
        if result.status == FAILED:
            raise result.error
        if result.failed_gates:
            raise GateFailure(result, self.spec.mark)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, (GateFailure, StageError, SpecError)):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def _traceback_filter(self, excinfo):
        traceback = super()._traceback_filter(excinfo)
        return traceback.filter(lambda entry: Path(str(entry.path)) not in _PLUMBING)

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
