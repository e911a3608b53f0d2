"""Run reports: report.json, report.md and report.html per experiment run, and the terminal summary.

Reports are built on the controller from the stages' JSON results (xdist workers' included).
A stage's plots are the PNG files directly in its artifact directory, found when the report
is written; a reused stage's directory is the one of the run it reuses, so its plots come along.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.core.store import write_json, write_text_atomic
from harness.report.html import to_html
from harness.report.markdown import hypothesis_markdown, markdown
from harness.report.text import counts, how, hypothesis_numbers, num

HYPOTHESIS_REPORT = "hypothesis_report.md"
_SHORT_ROW = (
    "id",
    "claim",
    "verdict",
    "outcome",
    "effect",
    "ci_low",
    "ci_high",
    "p_value",
    "p_adjusted",
    "alpha",
)


@dataclass
class Run:
    runs_dir: str
    experiment: str
    profile: str
    spec_file: str
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # in arrival (run) order
    hypotheses: dict[str, dict[str, Any]] = field(default_factory=dict)  # by id
    plan: dict[str, Any] | None = None  # the hypotheses' plan, its hash and the run's registration

    @property
    def dir(self) -> Path:
        return Path(self.runs_dir) / self.experiment / self.profile

    def hypothesis_rows(self) -> list[dict[str, Any]]:
        return sorted(self.hypotheses.values(), key=lambda h: h["index"])

    def hypotheses_json(self) -> dict[str, Any]:
        """hypotheses.json: the run's registration status, the plan and every verdict."""
        plan = self.plan or {}
        return {
            "experiment": self.experiment,
            "profile": self.profile,
            "spec_file": self.spec_file,
            "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "registration": plan.get("registration"),
            "plan_hash": plan.get("hash"),
            "plan": plan.get("plan"),
            "hypotheses": self.hypothesis_rows(),
        }

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for stage in self.stages.values():
            out[stage["outcome"]] = out.get(stage["outcome"], 0) + 1
        return out

    def to_json(self) -> dict[str, Any]:
        out = {
            "experiment": self.experiment,
            "profile": self.profile,
            "spec_file": self.spec_file,
            "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "summary": self.counts(),
            "stages": [{**stage, "plots": self.plots(stage)} for stage in self.stages.values()],
        }
        if self.plan:
            registration = self.plan["registration"]
            out["hypotheses"] = {
                "status": registration["status"],
                "reason": registration["reason"],
                "correction": self.plan["plan"]["correction"],
                "report": HYPOTHESIS_REPORT,
                "results": [{k: h[k] for k in _SHORT_ROW} for h in self.hypothesis_rows()],
            }
        return out

    def plots(self, stage: dict[str, Any]) -> list[str]:
        """The stage's plots, as POSIX paths relative to the report's directory."""
        return [Path(os.path.relpath(p, self.dir)).as_posix() for p in stage_plots(stage.get("dir"))]


def stage_plots(stage_dir: str | None) -> list[Path]:
    """The PNG files directly in a stage's artifact directory, sorted by name."""
    if not stage_dir:
        return []
    try:
        files = [p for p in Path(stage_dir).iterdir() if p.suffix.lower() == ".png" and p.is_file()]
    except OSError:  # the directory is gone (cleaned up since the stage resolved)
        return []
    return sorted(files, key=lambda p: p.name)


class RunReports:
    def __init__(self) -> None:
        self.runs: dict[tuple[str, str, str], Run] = {}

    def add(self, payload: dict[str, Any]) -> None:
        ident = (payload["runs_dir"], payload["experiment"], payload["profile"])
        run = self.runs.setdefault(
            ident, Run(payload["runs_dir"], payload["experiment"], payload["profile"], payload["spec_file"])
        )
        for result in payload["results"]:
            run.stages[result["stage"]] = result
        hypotheses = payload.get("hypotheses")
        if hypotheses:
            run.plan = {k: v for k, v in hypotheses.items() if k != "results"}
            for row in hypotheses["results"]:
                run.hypotheses[row["id"]] = row

    def write(self) -> None:
        for run in self.runs.values():
            run.dir.mkdir(parents=True, exist_ok=True)
            report = run.to_json()  # one snapshot, so the three files agree
            write_json(run.dir / "report.json", report)
            write_text_atomic(run.dir / "report.md", markdown(report))
            write_text_atomic(run.dir / "report.html", to_html(report, run.dir))
            if run.plan:
                hypotheses = run.hypotheses_json()
                write_json(run.dir / "hypotheses.json", hypotheses)
                write_text_atomic(run.dir / HYPOTHESIS_REPORT, hypothesis_markdown(hypotheses))

    def hypothesis_lines(self) -> list[str]:
        lines = []
        for run in self.runs.values():
            if not run.plan:
                continue
            registration = run.plan["registration"]
            lines.append(
                f"{run.experiment} [{run.profile}]: {registration['status'].upper()}: "
                f"{registration['reason']} -> {run.dir / HYPOTHESIS_REPORT}"
            )
            for h in run.hypothesis_rows():
                numbers = hypothesis_numbers(h)
                lines.append(f"  {h['verdict'].upper():<13} {h['id']:<12} {numbers} -> {h['outcome']}")
        return lines

    def summary_lines(self) -> list[str]:
        lines = []
        for run in self.runs.values():
            lines.append(
                f"{run.experiment} [{run.profile}]: {counts(run.counts())} -> {run.dir / 'report.md'}"
            )
            for stage in run.stages.values():
                lines.append(f"  {stage['outcome'].upper():<8} {stage['stage']:<20} {how(stage)}")
                for gate in stage["gates"]:
                    mark = "ok  " if gate["passed"] else "FAIL"
                    lines.append(f"           {mark} {gate['gate']:<40} measured {num(gate['value'])}")
        return lines
