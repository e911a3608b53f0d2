"""Run reports: report.json, report.md and report.html per experiment run, and the terminal summary.

Reports are built on the controller from the stages' JSON results (xdist workers' included)
and the spec's outline (its descriptions and every stage's name, in run order). A run that
resolves only some stages (`-k`, `::stage`, `-x`, `--lf`) keeps the other stages' rows from
the previous report of its directory, else from the store's latest run of the stage, marked
with when they come from. A stage's plots are the PNG files directly in its artifact
directory, and its analyses the `*analysis*.txt|md` files there, found when the report is
written; a reused stage's directory is the one of the run it reuses, so they come along.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.core.experiment import Experiment
from harness.core.store import StageStore, read_json, write_json, write_text_atomic
from harness.report.aggregates import aggregates, manifest_of
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
STORED = "stored"  # a row taken from the store: not resolved by any report's run
NOT_CHECKED = "not checked"


def spec_outline(experiment: Experiment) -> dict[str, Any]:
    """What a report takes from the spec: the descriptions, and every stage in run order
    (what tells a partial run from a whole one)."""
    outline = {
        "description": experiment.description,
        "stages": {name: spec.description for name, spec in experiment.stages.items()},
    }
    if experiment.rewrite:  # a rehearsal: what it replaced heads every report
        outline["rehearsal"] = experiment.rewrite.record()
    return outline


@dataclass
class Run:
    runs_dir: str
    experiment: str
    profile: str
    spec_file: str
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # in arrival (run) order
    hypotheses: dict[str, dict[str, Any]] = field(default_factory=dict)  # by id
    plan: dict[str, Any] | None = None  # the hypotheses' plan, its hash and the run's registration
    outline: dict[str, Any] | None = None  # see `spec_outline`

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
        """The outcomes of the stages this run resolved."""
        return _counts(self.stages.values())

    def to_json(self, previous: dict[str, Any] | None = None) -> dict[str, Any]:
        """The report; with `previous` (the last report.json of this directory), the stages
        this run did not resolve keep their rows from it, or from the store."""
        spec = self.outline or {"description": "", "stages": {}}
        rows = {name: self._row(stage) for name, stage in self.stages.items()}
        earlier = {
            s["stage"]: {**s, "earlier": s.get("earlier") or previous["generated_at"]}
            for s in (previous or {}).get("stages", [])
        }
        kept = {
            name: row
            for name in spec["stages"]
            if name not in rows and (row := self._kept(name, earlier.get(name))) is not None
        }
        order = [*spec["stages"], *(n for n in rows if n not in spec["stages"])]
        stages = [rows.get(n) or kept[n] for n in order if n in rows or n in kept]
        for stage in stages:
            stage["description"] = spec["stages"].get(stage["stage"], "")
        out = {
            "experiment": self.experiment,
            "profile": self.profile,
            "spec_file": self.spec_file,
            "description": spec["description"],
            "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "summary": _counts(stages),
            "run": {
                "executed": list(rows),
                "summary": self.counts(),
                "partial": bool(set(spec["stages"]) - set(rows)),
                "stages_in_spec": len(spec["stages"]),
            },
            "stages": stages,
            "aggregates": aggregates(stages),
        }
        if spec.get("rehearsal"):
            out["rehearsal"] = spec["rehearsal"]
        if self.plan:
            registration = self.plan["registration"]
            out["hypotheses"] = {
                "status": registration["status"],
                "reason": registration["reason"],
                "correction": self.plan["plan"]["correction"],
                "report": HYPOTHESIS_REPORT,
                "results": [{k: h[k] for k in _SHORT_ROW} for h in self.hypothesis_rows()],
            }
        elif previous and previous.get("hypotheses"):  # not evaluated in this run
            earlier = previous["hypotheses"].get("earlier") or previous["generated_at"]
            out["hypotheses"] = {**previous["hypotheses"], "earlier": earlier}
        return out

    def _row(self, stage: dict[str, Any], earlier: str | None = None) -> dict[str, Any]:
        """A stage's row: its result, its plots and analyses, when and how long its run took."""
        manifest = manifest_of(stage) or {}
        return {
            **stage,
            "plots": self.plots(stage),
            "analyses": self.analyses(stage),
            "ran_at": manifest.get("finished_at"),
            "ran_for_s": manifest.get("duration_s"),
            "earlier": earlier,
        }

    def _kept(self, name: str, previous: dict[str, Any] | None) -> dict[str, Any] | None:
        """The row of a stage this run did not resolve: its row in the previous report, else
        one made from the store's latest run of the stage (its gates not checked), else None."""
        if previous is not None:
            return self._row(previous, previous["earlier"])
        store = StageStore(Path(self.runs_dir), self.experiment, self.profile, name)
        manifest = store.latest()
        record = store.lookup(manifest["key"]) if manifest else None
        if record is None:
            return None
        stage = {
            "experiment": self.experiment,
            "stage": name,
            "kind": manifest["key_material"]["kind"],
            "status": STORED,
            "outcome": NOT_CHECKED,
            "reason": "latest run in the store; its gates not checked",
            "key": record.manifest["key"],
            "dir": str(record.dir),
            "duration_s": record.manifest.get("duration_s", 0.0),
            "metrics": record.metrics,
            "gates": [],
        }
        return self._row(stage, record.manifest.get("finished_at"))

    def plots(self, stage: dict[str, Any]) -> list[str]:
        """The stage's plots, as POSIX paths relative to the report's directory."""
        return [Path(os.path.relpath(p, self.dir)).as_posix() for p in stage_plots(stage.get("dir"))]

    def analyses(self, stage: dict[str, Any]) -> list[str]:
        """The stage's analyses (`*analysis*.txt|md`), as POSIX paths relative to the report."""
        return [Path(os.path.relpath(p, self.dir)).as_posix() for p in stage_analyses(stage.get("dir"))]


def _counts(stages: Iterable[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for stage in stages:
        out[stage["outcome"]] = out.get(stage["outcome"], 0) + 1
    return out


def stage_plots(stage_dir: str | None) -> list[Path]:
    """The PNG files directly in a stage's artifact directory, sorted by name."""
    return _files(stage_dir, lambda p: p.suffix.lower() == ".png")


def stage_analyses(stage_dir: str | None) -> list[Path]:
    """The written analyses directly in a stage's artifact directory (e.g. mcq_compare's
    behavioral_shift_analysis.txt), sorted by name."""
    return _files(stage_dir, lambda p: "analysis" in p.stem.lower() and p.suffix.lower() in (".txt", ".md"))


def _files(stage_dir: str | None, wanted: Callable[[Path], bool]) -> list[Path]:
    if not stage_dir:
        return []
    try:
        files = [p for p in Path(stage_dir).iterdir() if wanted(p) and p.is_file()]
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
        run.outline = payload.get("outline", run.outline)
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
            previous = read_json(run.dir / "report.json")
            report = run.to_json(previous if isinstance(previous, dict) else None)  # one snapshot for 3 files
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
