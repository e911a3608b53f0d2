"""Run reports: report.json and report.md per experiment run, and the terminal summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.store import write_json


@dataclass
class Run:
    runs_dir: str
    experiment: str
    profile: str
    spec_file: str
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # in arrival (run) order

    @property
    def dir(self) -> Path:
        return Path(self.runs_dir) / self.experiment / self.profile

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for stage in self.stages.values():
            out[stage["outcome"]] = out.get(stage["outcome"], 0) + 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "profile": self.profile,
            "spec_file": self.spec_file,
            "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "summary": self.counts(),
            "stages": list(self.stages.values()),
        }


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

    def write(self) -> None:
        for run in self.runs.values():
            run.dir.mkdir(parents=True, exist_ok=True)
            write_json(run.dir / "report.json", run.to_json())
            (run.dir / "report.md").write_text(markdown(run), encoding="utf-8")

    def summary_lines(self) -> list[str]:
        lines = []
        for run in self.runs.values():
            counts = ", ".join(f"{n} {k}" for k, n in sorted(run.counts().items()))
            lines.append(f"{run.experiment} [{run.profile}]: {counts} -> {run.dir / 'report.md'}")
            for stage in run.stages.values():
                lines.append(f"  {stage['outcome'].upper():<8} {stage['stage']:<20} {_how(stage)}")
                for gate in stage["gates"]:
                    mark = "ok  " if gate["passed"] else "FAIL"
                    lines.append(f"           {mark} {gate['gate']:<40} measured {_num(gate['value'])}")
        return lines


def _how(stage: dict[str, Any]) -> str:
    if stage["status"] in ("ran", "reused"):
        took = f" in {stage['duration_s']:.2f}s" if stage["status"] == "ran" else ""
        return f"{stage['status']}{took} ({stage['reason']})"
    return stage["reason"]


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(run: Run) -> str:
    counts = ", ".join(f"{n} {k}" for k, n in sorted(run.counts().items()))
    out = [
        f"# {run.experiment} — profile `{run.profile}`",
        "",
        f"Spec: `{run.spec_file}`  ",
        f"Generated: {datetime.now(timezone.utc).isoformat(timespec='seconds')}  ",
        f"Stages: {counts}",
        "",
        "| stage | kind | outcome | ran / reused | why | duration (s) | key |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in run.stages.values():
        out.append(
            f"| {s['stage']} | {s['kind']} | {s['outcome']} | {s['status']} | {_cell(s['reason'])} "
            f"| {s['duration_s']:.2f} | `{s['key'] or ''}` |"
        )
    gates = [(s["stage"], g) for s in run.stages.values() for g in s["gates"]]
    if gates:
        out += [
            "",
            "## Gates",
            "",
            "| stage | gate | measured | threshold | result | where |",
            "|---|---|---|---|---|---|",
        ]
        for stage, g in gates:
            result = "passed" if g["passed"] else "ABORT" if g["aborted"] else "FAILED"
            if g["problem"]:
                result += f": {g['problem']}"
            threshold = f"{g['op']} {g['threshold']:g}" + (f" (abort {g['abort']})" if g["abort"] else "")
            cells = [stage, f"`{_cell(g['gate'])}`", _num(g["value"]), threshold, _cell(result), g["where"]]
            out.append("| " + " | ".join(cells) + " |")
    metrics = [(s["stage"], s["metrics"]) for s in run.stages.values() if s["metrics"]]
    if metrics:
        out += ["", "## Metrics", ""]
        for stage, values in metrics:
            out += [f"### {stage}", "", "| metric | value |", "|---|---|"]
            out += [f"| {name} | {_cell(_metric(value))} |" for name, value in values.items()]
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def _metric(value: Any) -> str:
    if isinstance(value, dict) and "value" in value:
        ci = f" [{_num(value.get('ci_low'))}, {_num(value.get('ci_high'))}]" if "ci_low" in value else ""
        return _num(value["value"]) + ci
    return _num(value)
