"""Run reports: report.json, report.md and report.html per experiment run, and the terminal summary.

Reports are built on the controller from the stages' JSON results (xdist workers' included).
A stage's plots are the PNG files directly in its artifact directory, found when the report
is written; a reused stage's directory is the one of the run it reuses, so its plots come along.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

from harness.core.outcomes import Outcome, Status
from harness.core.store import write_json, write_text_atomic

BAD_OUTCOMES = (Outcome.FAILED, Outcome.ERROR, Outcome.ABORTED)
LIST_ENDS = 3  # a metric list longer than twice this shows only its ends
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
                numbers = _hypothesis_numbers(h)
                lines.append(f"  {h['verdict'].upper():<13} {h['id']:<12} {numbers} -> {h['outcome']}")
        return lines

    def summary_lines(self) -> list[str]:
        lines = []
        for run in self.runs.values():
            lines.append(
                f"{run.experiment} [{run.profile}]: {_counts(run.counts())} -> {run.dir / 'report.md'}"
            )
            for stage in run.stages.values():
                lines.append(f"  {stage['outcome'].upper():<8} {stage['stage']:<20} {_how(stage)}")
                for gate in stage["gates"]:
                    mark = "ok  " if gate["passed"] else "FAIL"
                    lines.append(f"           {mark} {gate['gate']:<40} measured {_num(gate['value'])}")
        return lines


# -- text shared by every format ---------------------------------------------------------


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


def _how(stage: dict[str, Any]) -> str:
    if stage["status"] in (Status.RAN, Status.REUSED):
        took = f" in {stage['duration_s']:.2f}s" if stage["status"] == Status.RAN else ""
        return f"{stage['status']}{took} ({stage['reason']})"
    return stage["reason"]


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


def _metric(value: Any) -> str:
    if isinstance(value, dict) and "value" in value:
        ci = f" [{_num(value.get('ci_low'))}, {_num(value.get('ci_high'))}]" if "ci_low" in value else ""
        return _num(value["value"]) + ci
    if isinstance(value, list):  # e.g. a loss curve: the ends and the length, the whole is in report.json
        if len(value) <= 2 * LIST_ENDS:
            return "[" + ", ".join(_num(v) for v in value) + "]"
        head = ", ".join(_num(v) for v in value[:LIST_ENDS])
        tail = ", ".join(_num(v) for v in value[-LIST_ENDS:])
        return f"[{head}, …, {tail}] ({len(value)} values)"
    return _num(value)


def _effect(h: dict[str, Any]) -> str:
    if h["effect"] is None:
        return "n/a"
    return f"{_num(h['effect'])} [{_num(h['ci_low'])}, {_num(h['ci_high'])}]"


def _hypothesis_numbers(h: dict[str, Any]) -> str:
    if h["p_value"] is None:
        return h["why"]
    return (
        f"effect {_effect(h)}, p {_num(h['p_value'])}, {h['correction']} p {_num(h['p_adjusted'])}, "
        f"alpha {h['alpha']:g}"
    )


def _threshold(gate: dict[str, Any]) -> str:
    return f"{gate['op']} {gate['threshold']:g}" + (f" (abort {gate['abort']})" if gate["abort"] else "")


def _gate_result(gate: dict[str, Any]) -> str:
    result = "passed" if gate["passed"] else "ABORT" if gate["aborted"] else "FAILED"
    return result + (f": {gate['problem']}" if gate["problem"] else "")


def _gates(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(s["stage"], g) for s in report["stages"] for g in s["gates"]]


def _detailed(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The stages with metrics or plots to show."""
    return [s for s in report["stages"] if s["metrics"] or s["plots"]]


# -- report.md ---------------------------------------------------------------------------


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(report: dict[str, Any]) -> str:
    sections = (_md_stages(report), _md_gates(report), _md_hypotheses(report), _md_details(report))
    return "\n".join(line for section in sections for line in section).rstrip() + "\n"


def _md_stages(report: dict[str, Any]) -> list[str]:
    """The title, the run's counts and one row per stage."""
    out = [
        f"# {report['experiment']} — profile `{report['profile']}`",
        "",
        f"Spec: `{report['spec_file']}`  ",
        f"Generated: {report['generated_at']}  ",
        f"Stages: {_counts(report['summary'])}",
        "",
        "| stage | kind | outcome | ran / reused | why | duration (s) | key |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in report["stages"]:
        out.append(
            f"| {s['stage']} | {s['kind']} | {s['outcome']} | {s['status']} | {_cell(s['reason'])} "
            f"| {s['duration_s']:.2f} | `{s['key'] or ''}` |"
        )
    return out


def _md_gates(report: dict[str, Any]) -> list[str]:
    gates = _gates(report)
    if not gates:
        return []
    out = [
        "",
        "## Gates",
        "",
        "| stage | gate | measured | threshold | result | where |",
        "|---|---|---|---|---|---|",
    ]
    for stage, g in gates:
        cells = [stage, f"`{_cell(g['gate'])}`", _num(g["value"]), _threshold(g), _cell(_gate_result(g))]
        out.append("| " + " | ".join([*cells, g["where"]]) + " |")
    return out


def _md_hypotheses(report: dict[str, Any]) -> list[str]:
    hypotheses = report.get("hypotheses")
    if not hypotheses:
        return []
    out = [
        "",
        "## Hypotheses",
        "",
        f"**{hypotheses['status']}**: {_cell(hypotheses['reason'])}. "
        f"Details: [{hypotheses['report']}]({hypotheses['report']})",
        "",
        "| hypothesis | verdict | outcome | effect [CI] | p "
        f"| adjusted p ({hypotheses['correction']}) | alpha |",
        "|---|---|---|---|---|---|---|",
    ]
    for h in hypotheses["results"]:
        cells = [h["id"], h["verdict"], h["outcome"], _effect(h), _num(h["p_value"]), _num(h["p_adjusted"])]
        out.append("| " + " | ".join([*cells, f"{h['alpha']:g}"]) + " |")
    return out


def _md_details(report: dict[str, Any]) -> list[str]:
    """Each stage's metrics and links to its plots."""
    detailed = _detailed(report)
    if not detailed:
        return []
    out = ["", "## Metrics and plots", ""]
    for s in detailed:
        out += [f"### {s['stage']}", ""]
        if s["metrics"]:
            out += ["| metric | value |", "|---|---|"]
            out += [f"| {_cell(name)} | {_cell(_metric(v))} |" for name, v in s["metrics"].items()]
            out.append("")
        for plot in s["plots"]:
            # percent-encoded so that names with spaces or parentheses still make a link
            alt = f"{s['stage']}: {Path(plot).name}".replace("[", "\\[").replace("]", "\\]")
            out += [f"![{alt}]({quote(plot)})", ""]
    return out


# -- hypothesis_report.md ----------------------------------------------------------------

_DIRECTIONS = {"greater": "contrast > 0", "less": "contrast < 0", "two-sided": "contrast ≠ 0"}


def _lock_commit(registration: dict[str, Any]) -> str:
    commit = registration.get("lock_commit")
    if registration.get("locked_at") is None:
        return "none"
    if not commit:
        return "not committed (commit it before running: its commit is the lock's external time stamp)"
    extra = "; changed since, not committed" if registration.get("lock_uncommitted") else ""
    return f"committed in `{commit[:12]}` at {registration.get('lock_committed_at')}{extra}"


def _code(text: str) -> str:
    """An inline code span, fenced by two backticks when the text holds one (quoted set names)."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def hypothesis_markdown(data: dict[str, Any]) -> str:
    """Each hypothesis with its test, effect and CI, raw and adjusted p and verdict, under the
    run's registration status: an exploratory run is never called pre-registered."""
    registration, plan, rows = data["registration"], data["plan"], data["hypotheses"]
    out = [
        f"# Hypotheses: {data['experiment']} — profile `{data['profile']}`",
        "",
        f"**Status: {registration['status']}** — {registration['reason']}",
        "",
        f"Spec: `{data['spec_file']}`  ",
        f"Generated: {data['generated_at']}  ",
        f"Analysis sha256 (plan and the recipes of the stages behind it): `{data['plan_hash']}`  ",
        f"Lock file: {_lock_commit(registration)}  ",
        f"Correction: {plan['correction']} across the {len(plan['tests'])} hypotheses of the plan  ",
        f"Policies: inconclusive → {plan['on_inconclusive']}, refuted → {plan['on_refuted']}  ",
        f"Resampling seed: {plan['seed']}",
        "",
        "| hypothesis | metric | verdict | outcome | contrast [CI] | p "
        f"| adjusted p ({plan['correction']}) | alpha | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for h in rows:
        cells = [h["id"], _cell(h["metric"]), f"**{h['verdict']}**", h["outcome"], _effect(h)]
        cells += [_num(h["p_value"]), _num(h["p_adjusted"]), f"{h['alpha']:g}", h["status"]]
        out.append("| " + " | ".join(cells) + " |")
    missing = [name for name in plan["tests"] if name not in {h["id"] for h in rows}]
    if missing:
        out += ["", f"Not run in this session (deselected): {', '.join(missing)}."]
    for h in rows:
        exact = " (exact: every relabelling)" if h["exact"] else ""
        out += [
            "",
            f"## {h['id']}: {h['verdict']}",
            "",
            f"{h['claim']}  ",
            f"*{h['where']}*",
            "",
            f"- metric: {h['metric']}",
            f"- contrast: {_code(h['contrast'])}",
        ]
        if h["sets"]:
            out += ["", "| set | weight | mean | units | level | values | unit means |", "|" + "---|" * 7]
            for s in h["sets"]:
                means = ", ".join(f"{u}: {_num(m)}" for u, m in (s["unit_means"] or {}).items()) or "(many)"
                cells = [
                    f"`{s['stage']}` {_code(s['samples'])}",
                    f"{s['weight']:+g}",
                    _num(s["mean"]),
                    str(s["n_units"]),
                    _cell(s["level"]),
                    str(s["n_values"]),
                    _cell(means),
                ]
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
        out += [
            f"- test: {h['test']}{exact}, {h['n_resamples']} resamples, resampling {h['resampling']}; "
            f"direction {h['direction']} ({_DIRECTIONS[h['direction']]}), alpha {h['alpha']:g}",
            f"- power: {h['power'] or 'the test can reach alpha at these numbers of units'}",
            f"- effect (the contrast): {_effect(h)} ({h['confidence']:.0%} CI)",
            f"- p: {_num(h['p_value'])}; adjusted ({h['correction']}, {h['family_size']} hypotheses): "
            f"{_num(h['p_adjusted'])}",
            f"- verdict: **{h['verdict']}** — {h['why']}",
            f"- item: {h['outcome']}; {h['status']}",
        ]
    return "\n".join(out).rstrip() + "\n"


# -- report.html -------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; color: #222; }
body { max-width: 1100px; margin: 2em auto; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { font: 12px ui-monospace, monospace; }
tr.bad td { background: #fdecea; }
.passed { color: #1a7f37; }
.failed, .error, .aborted { color: #c62828; font-weight: 600; }
.skipped { color: #8a6d00; }
figure { display: inline-block; margin: 0 1em 1em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 12px; color: #555; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _td(content: str, cls: str = "") -> str:
    """A cell of content that is already HTML."""
    return f'<td class="{cls}">{content}</td>' if cls else f"<td>{content}</td>"


def _tr(cells: Iterable[str], bad: bool = False) -> str:
    return f'<tr class="bad">{"".join(cells)}</tr>' if bad else f"<tr>{''.join(cells)}</tr>"


def _table(head: list[str], rows: list[str]) -> list[str]:
    header = "".join(f"<th>{_e(h)}</th>" for h in head)
    return ["<table>", f"<thead><tr>{header}</tr></thead>", "<tbody>", *rows, "</tbody>", "</table>"]


def _outcome(outcome: str) -> str:
    mark = "✗ " if outcome in BAD_OUTCOMES else ""
    return _td(mark + _e(outcome), _e(outcome))


def _figure(stage: str, plot: str, report_dir: Path) -> str:
    alt = _e(f"{stage}: {Path(plot).name}")
    try:
        data = base64.b64encode((report_dir / plot).read_bytes()).decode("ascii")
    except OSError:  # removed between listing and reading
        return f"<p>missing plot: <code>{_e(plot)}</code></p>"
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{alt}" />'
        f"<figcaption><code>{_e(plot)}</code></figcaption></figure>"
    )


def to_html(report: dict[str, Any], report_dir: Path) -> str:
    """One self-contained page: plots are embedded as data URIs, no script, no external resource.
    It is also well-formed XML (void elements closed, only XML's entities), which lets tests
    parse it with the standard library."""
    sections = (
        _html_head(report),
        _html_stages(report),
        _html_gates(report),
        _html_hypotheses(report),
        _html_details(report, report_dir),
    )
    return "\n".join([*(line for section in sections for line in section), "</body>", "</html>"]) + "\n"


def _html_head(report: dict[str, Any]) -> list[str]:
    """The document's head, the title and the run's counts."""
    title = f"{report['experiment']} — profile {report['profile']}"
    bad = any(report["summary"].get(o) for o in BAD_OUTCOMES)
    return [
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head><meta charset="utf-8" />',
        '<meta name="viewport" content="width=device-width, initial-scale=1" />',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style></head>",
        "<body>",
        f"<h1>{_e(report['experiment'])} — profile <code>{_e(report['profile'])}</code></h1>",
        f"<p>Spec: <code>{_e(report['spec_file'])}</code><br />Generated: {_e(report['generated_at'])}<br />",
        f'Stages: <span class="{"failed" if bad else "passed"}">{_e(_counts(report["summary"]))}</span></p>',
    ]


def _html_stages(report: dict[str, Any]) -> list[str]:
    """One row per stage; a stage with metrics or plots links to its section."""
    linked = {s["stage"] for s in _detailed(report)}
    rows = []
    for s in report["stages"]:
        stage = _e(s["stage"])
        link = f'<a href="#stage-{stage}">{stage}</a>' if s["stage"] in linked else stage
        cells = [_td(link), _td(_e(s["kind"])), _outcome(s["outcome"]), _td(_e(s["status"]))]
        cells += [_td(_e(s["reason"])), _td(f"{s['duration_s']:.2f}", "num")]
        cells.append(_td(f"<code>{_e(s['key'] or '')}</code>"))
        rows.append(_tr(cells, bad=s["outcome"] in BAD_OUTCOMES))
    return _table(["stage", "kind", "outcome", "ran / reused", "why", "duration (s)", "key"], rows)


def _html_gates(report: dict[str, Any]) -> list[str]:
    gates = _gates(report)
    if not gates:
        return []
    rows = []
    for stage, g in gates:
        cells = [_td(_e(stage)), _td(f"<code>{_e(g['gate'])}</code>"), _td(_e(_num(g["value"])), "num")]
        cells += [_td(_e(_threshold(g))), _td(_e(_gate_result(g)), "passed" if g["passed"] else "failed")]
        rows.append(_tr([*cells, _td(_e(g["where"]))], bad=not g["passed"]))
    return ["<h2>Gates</h2>", *_table(["stage", "gate", "measured", "threshold", "result", "where"], rows)]


def _html_hypotheses(report: dict[str, Any]) -> list[str]:
    hypotheses = report.get("hypotheses")
    if not hypotheses:
        return []
    out = [
        "<h2>Hypotheses</h2>",
        f"<p><strong>{_e(hypotheses['status'])}</strong>: {_e(hypotheses['reason'])}. "
        f'Details: <a href="{_e(hypotheses["report"])}">{_e(hypotheses["report"])}</a></p>',
    ]
    rows = []
    for h in hypotheses["results"]:
        cells = [_td(_e(h["id"])), _td(_e(h["verdict"])), _outcome(h["outcome"]), _td(_e(_effect(h)))]
        cells += [_td(_e(_num(h["p_value"])), "num"), _td(_e(_num(h["p_adjusted"])), "num")]
        rows.append(_tr([*cells, _td(f"{h['alpha']:g}", "num")], bad=h["outcome"] == Outcome.FAILED))
    adjusted = f"adjusted p ({hypotheses['correction']})"
    return out + _table(["hypothesis", "verdict", "outcome", "effect [CI]", "p", adjusted, "alpha"], rows)


def _html_details(report: dict[str, Any], report_dir: Path) -> list[str]:
    """A section per stage with its metrics and its plots embedded."""
    detailed = _detailed(report)
    if not detailed:
        return []
    out = ["<h2>Metrics and plots</h2>"]
    for s in detailed:
        out += [f'<section id="stage-{_e(s["stage"])}">', f"<h3>{_e(s['stage'])}</h3>"]
        if s["metrics"]:
            rows = [_tr([_td(_e(k)), _td(_e(_metric(v)))]) for k, v in s["metrics"].items()]
            out += _table(["metric", "value"], rows)
        out += [_figure(s["stage"], plot, report_dir) for plot in s["plots"]]
        out.append("</section>")
    return out
