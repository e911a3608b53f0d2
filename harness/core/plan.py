"""`--plan`: what a run would do, stage by stage, and what it would ask of paid APIs; runs nothing.

Keys are computed as a run computes them (ExperimentRun), in dependency order: a stage whose
upstreams are all reused has a known key, so it is reused or its reason to run is known; one
whose upstream would run has no key yet, and runs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from harness.core.execution import ExperimentRun, with_inputs
from harness.core.outcomes import Status
from harness.core.stage import Estimate, StageKind

RUN, REUSE, SKIP, FAIL = "run", "reuse", "skip", "fail"


@dataclass(frozen=True)
class PlannedStage:
    experiment: str
    profile: str | None
    stage: str
    kind: str
    action: str  # RUN, REUSE, SKIP (after an unfinished or aborting upstream), FAIL (no key)
    why: str
    estimate: Estimate | None = None  # for a stage that would run, of a kind that can say


def plan_run(run: ExperimentRun) -> list[PlannedStage]:
    """The plan of `run`'s experiment; `run` must be one that has not started (no executor is
    used: reused results are read from the store, nothing is submitted)."""
    planner = ExperimentRun(run.experiment, run.runs_dir, run.rerun, remote=run.remote)
    experiment = planner.experiment
    running: set[str] = set()
    planned = []
    for name, spec in experiment.stages.items():
        waiting = [up for up in spec.needs.values() if up in running]
        if waiting:
            action, why = RUN, f"upstream {waiting[0]} will run"
        else:
            result = planner._settle(spec, run_here=False)
            if result is None:
                action, why = RUN, planner.why_to_run(spec)
            else:
                planner.results[name] = result
                action, why = _action(result.status), result.reason
                if result.abort is not None:  # the stages that need it are skipped
                    why += f"; aborts: {result.abort.describe()}"
        estimate = None
        if action == RUN:
            running.add(name)
            if spec.kind.estimate:
                estimate = _estimate(spec.kind, with_inputs(spec))
        planned.append(
            PlannedStage(experiment.name, experiment.profile, name, spec.kind.name, action, why, estimate)
        )
    return planned


def _estimate(kind: StageKind, params: Mapping[str, Any]) -> Estimate | None:
    try:
        return kind.estimate(params)
    except Exception as exc:  # advice only: a data problem is the run's to report, at its line
        return Estimate(None, None, None, None, f"no estimate: {type(exc).__name__}: {exc}")


def _action(status: Status) -> str:
    if status == Status.REUSED:
        return REUSE
    return SKIP if status == Status.SKIPPED else FAIL


def plan_lines(planned: Iterable[PlannedStage]) -> list[str]:
    """The plan as a table, one row per stage, then the totals of the stages that would run."""
    planned = list(planned)
    rows = [("stage", "action", "requests", "input tok", "output tok", "cost USD", "why")]
    for p in planned:
        where = f"{p.experiment}[{p.profile}]::{p.stage}" if p.profile else f"{p.experiment}::{p.stage}"
        rows.append((where, p.action, *_estimate_cells(p.estimate), _why(p)))
    estimates = [p.estimate for p in planned if p.estimate is not None]
    counts = {action: sum(p.action == action for p in planned) for action in (RUN, REUSE, SKIP, FAIL)}
    summary = ", ".join(f"{n} to {action}" for action, n in counts.items() if n)
    rows.append((f"total: {summary or 'no stage'}", "", *_estimate_cells(_total(estimates)), ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]  # "why" is not padded
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, [*widths, 0], strict=True)).rstrip() for row in rows
    ]


def _why(p: PlannedStage) -> str:
    note = f" ({p.estimate.note})" if p.estimate and p.estimate.note else ""
    return p.why + note


def _total(estimates: list[Estimate]) -> Estimate | None:
    """Sums over the stages that would run; a part some stage cannot say is unknown ("?")."""
    if not estimates:
        return None

    def total(values):
        values = list(values)
        return None if any(v is None for v in values) else sum(values)

    return Estimate(
        total(e.requests for e in estimates),
        total(e.input_tokens for e in estimates),
        total(e.output_tokens for e in estimates),
        total(e.cost_usd for e in estimates),
    )


def _estimate_cells(estimate: Estimate | None) -> tuple[str, str, str, str]:
    if estimate is None:
        return ("-", "-", "-", "-")

    def count(value: int | None) -> str:
        return "?" if value is None else f"{value:,}"

    cost = "unknown price" if estimate.cost_usd is None else f"{estimate.cost_usd:,.2f}"
    return (count(estimate.requests), count(estimate.input_tokens), count(estimate.output_tokens), cost)
