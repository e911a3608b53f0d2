"""Export of each run's params, metrics and plots to experiment trackers, off by default:
`--track wandb --track mlflow` or ini `harness_trackers = wandb mlflow`, with the `trackers`
extra installed (`pip install -e '.[trackers]'`).

At the end of the session the controller reads each run's report.json and its stages'
manifests and logs one tracker run per experiment run: params as `<stage>.<param path>`,
metrics as `<stage>/<metric>` (a CI's bounds as `<metric>.ci_low` and `.ci_high`, a list of
numbers as a series over steps), the stages' plots as images/artifacts, and the gates passed.
Each tracker reads its usual settings from the environment: WANDB_PROJECT, WANDB_MODE
(`offline` writes under WANDB_DIR), WANDB_API_KEY; MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME.
The tracker's project / experiment defaults to the experiment's name, the run's name is its profile.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.core.store import read_json
from harness.report.aggregates import manifest_of

INSTALL = "pip install -e '.[trackers]'"
MLFLOW_PARAM_LIMIT = 6000  # characters of a param value MLflow stores


class TrackerError(Exception):
    """A tracker asked for that is unknown or not installed."""


@dataclass(frozen=True)
class TrackedRun:
    """What a tracker receives of one experiment run."""

    experiment: str
    profile: str
    params: dict[str, dict[str, Any]]  # by stage, as the manifests record them
    metrics: dict[str, float]  # "<stage>/<metric>[.ci_low|.ci_high|.<key>]" -> number
    series: dict[str, list[float]]  # "<stage>/<metric>" -> a value per step
    plots: dict[str, Path]  # "<stage>/<file name>" -> PNG file
    tags: dict[str, str]


def checked(names: Iterable[str]) -> tuple[str, ...]:
    """The trackers asked for, each known and installed; TrackerError names what is not."""
    names = tuple(dict.fromkeys(names))
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        raise TrackerError(f"unknown tracker {', '.join(unknown)}: choose from {', '.join(EXPORTERS)}")
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        raise TrackerError(f"tracker {', '.join(missing)} is not installed: {INSTALL}")
    return names


def tracked_run(run_dir: Path) -> TrackedRun:
    """The run of report.json in `run_dir` (`<runs>/<experiment>/<profile>`)."""
    report = read_json(run_dir / "report.json")
    params, metrics, series, plots = {}, {}, {}, {}
    for stage in report["stages"]:
        name = stage["stage"]
        manifest = manifest_of(stage)
        if manifest is not None:
            params[name] = manifest["params"]
        for metric, value in stage["metrics"].items():
            _add_metric(f"{name}/{metric}", value, metrics, series)
        for plot in stage.get("plots", []):
            plots[f"{name}/{Path(plot).name}"] = run_dir / plot
    gates = [g for s in report["stages"] for g in s["gates"]]
    metrics["harness/gates_passed"] = float(sum(g["passed"] for g in gates))
    metrics["harness/gates"] = float(len(gates))
    tags = {"profile": report["profile"], "spec_file": report["spec_file"]}
    tags.update({f"outcome.{outcome}": str(n) for outcome, n in report["summary"].items()})
    return TrackedRun(report["experiment"], report["profile"], params, metrics, series, plots, tags)


def _add_metric(key: str, value: Any, metrics: dict[str, float], series: dict[str, list[float]]) -> None:
    """Numbers as they are; a mapping's numbers under `key.<field>` (its `value` under `key`);
    a list of numbers as a series. Text and nulls are not tracked."""
    if isinstance(value, bool) or (isinstance(value, (int, float)) and math.isfinite(value)):
        metrics[key] = float(value)
    elif isinstance(value, Mapping):
        for field, inner in value.items():
            _add_metric(key if field == "value" else f"{key}.{field}", inner, metrics, series)
    elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
        series[key] = [float(v) for v in value]


def export(run_dirs: Iterable[Path], trackers: Iterable[str]) -> list[str]:
    """Log every run to every tracker; a line per export saying where it went."""
    lines = []
    for run_dir in run_dirs:
        run = tracked_run(run_dir)
        for tracker in trackers:
            lines.append(f"{run.experiment} [{run.profile}] -> {tracker}: {EXPORTERS[tracker](run)}")
    return lines


def _to_wandb(run: TrackedRun) -> str:
    import wandb

    logged = wandb.init(
        project=os.environ.get("WANDB_PROJECT") or run.experiment,
        name=run.profile,
        config=run.params,
        tags=[run.profile],
        settings=wandb.Settings(console="off"),  # pytest owns the terminal
    )
    try:
        for step in range(max(map(len, run.series.values()), default=0)):
            logged.log({k: v[step] for k, v in run.series.items() if step < len(v)}, step=step)
        if run.plots:
            logged.log({k: wandb.Image(str(path)) for k, path in run.plots.items()})
        logged.summary.update({**run.metrics, **{f"tag/{k}": v for k, v in run.tags.items()}})
        where = logged.url or str(Path(logged.dir).parent)  # offline: the run's directory
    finally:
        logged.finish()
    return where


_MLFLOW_KEY = re.compile(r"[^\w./\- :]")  # MLflow allows only these in names: a matrix's `em[a,1]` -> em_a_1_


def _to_mlflow(run: TrackedRun) -> str:
    import mlflow

    mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or run.experiment)
    with mlflow.start_run(run_name=run.profile, tags=run.tags) as active:
        mlflow.log_params({_MLFLOW_KEY.sub("_", k): _param(v) for k, v in _flat(run.params).items()})
        mlflow.log_metrics({_MLFLOW_KEY.sub("_", k): v for k, v in run.metrics.items()})
        for key, values in run.series.items():
            for step, value in enumerate(values):
                mlflow.log_metric(_MLFLOW_KEY.sub("_", key), value, step=step)
        for key, path in run.plots.items():
            mlflow.log_artifact(str(path), artifact_path=_MLFLOW_KEY.sub("_", key.split("/")[0]))
        return f"{mlflow.get_tracking_uri()} run {active.info.run_id}"


def _flat(value: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, inner in value.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        out.update(_flat(inner, path) if isinstance(inner, Mapping) and inner else {path: inner})
    return out


def _param(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= MLFLOW_PARAM_LIMIT else text[: MLFLOW_PARAM_LIMIT - 1] + "…"


EXPORTERS: dict[str, Callable[[TrackedRun], str]] = {"wandb": _to_wandb, "mlflow": _to_mlflow}
