"""report.html: one self-contained page, plots embedded."""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from harness.core.outcomes import Outcome
from harness.report.text import (
    BAD_OUTCOMES,
    analyses,
    counts,
    detailed_stages,
    effect,
    gate_count,
    gate_result,
    gate_rows,
    headline_metrics,
    mean_sd,
    metric,
    num,
    per_stage,
    rehearsal,
    this_run,
    threshold,
    took,
    why,
)

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
        _html_headline(report),
        _html_stages(report),
        _html_gates(report),
        _html_aggregates(report),
        _html_hypotheses(report),
        _html_details(report, report_dir),
    )
    return "\n".join([*(line for section in sections for line in section), "</body>", "</html>"]) + "\n"


def _html_head(report: dict[str, Any]) -> list[str]:
    """The document's head, the title and the run's counts."""
    title = f"{report['experiment']} — profile {report['profile']}"
    bad = any(report["summary"].get(o) for o in BAD_OUTCOMES)
    rehearsed = rehearsal(report)
    return [
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head><meta charset="utf-8" />',
        '<meta name="viewport" content="width=device-width, initial-scale=1" />',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style></head>",
        "<body>",
        f"<h1>{_e(report['experiment'])} — profile <code>{_e(report['profile'])}</code></h1>",
        *([f'<p class="failed">{"<br />".join(map(_e, rehearsed))}</p>'] if rehearsed else []),
        *([f'<p class="description">{_e(report["description"])}</p>'] if report["description"] else []),
        f"<p>Spec: <code>{_e(report['spec_file'])}</code><br />Generated: {_e(report['generated_at'])}<br />",
        f'Stages: <span class="{"failed" if bad else "passed"}">{_e(counts(report["summary"]))}</span><br />',
        f"{_e(this_run(report))}</p>",
    ]


def _link(label: str, path: str) -> str:
    return f'<a href="{_e(quote(path))}">{_e(label)}</a>'


def _html_headline(report: dict[str, Any]) -> list[str]:
    """What the run shows: every gate, the hypotheses' verdicts, the metrics the gates read
    and links to the written analyses."""
    out = ["<h2>Headline</h2>"]
    gates = gate_rows(report)
    if gates:
        out += [f"<p>{_e(gate_count(report))}:</p>", "<ul>"]
        for stage, g in gates:
            mark, cls = ("✓", "passed") if g["passed"] else ("✗", "failed")
            out.append(
                f'<li><span class="{cls}">{mark}</span> {_e(stage)}: <code>{_e(g["gate"])}</code> — '
                f"measured {_e(num(g['value']))} ({_e(gate_result(g))})</li>"
            )
        out.append("</ul>")
    else:
        out.append("<p>No gates.</p>")
    hypotheses = report.get("hypotheses")
    if hypotheses:
        verdicts = ", ".join(f"{h['id']} {h['verdict']}" for h in hypotheses["results"]) or "none evaluated"
        out.append(f"<p>Hypotheses ({_e(hypotheses['status'])}): {_e(verdicts)}.</p>")
    metrics = headline_metrics(report)
    if metrics:
        rows = [
            _tr([_td(_e(stage)), _td(_e(name)), _td(_e(metric(value)))]) for stage, name, value in metrics
        ]
        out += [
            "<p>Headline metrics (the metrics the gates read):</p>",
            *_table(["stage", "metric", "value"], rows),
        ]
    links = analyses(report)
    if links:
        out.append("<p>Analyses: " + ", ".join(_link(label, path) for label, path in links) + "</p>")
    return out


def _html_aggregates(report: dict[str, Any]) -> list[str]:
    if not report["aggregates"]:
        return []
    rows = [
        _tr(
            [_td(_e(a["group"])), _td(_e(a["metric"])), _td(str(a["n"]), "num")]
            + [_td(_e(mean_sd(a)), "num"), _td(_e(per_stage(a)))]
        )
        for a in report["aggregates"]
    ]
    head = ["stages", "metric", "n", "mean ± sd", "per stage"]
    return ["<h2>Replicates (stages that differ only by seed)</h2>", *_table(head, rows)]


def _html_stages(report: dict[str, Any]) -> list[str]:
    """One row per stage; a stage with metrics or plots links to its section."""
    linked = {s["stage"] for s in detailed_stages(report)}
    rows = []
    for s in report["stages"]:
        stage = _e(s["stage"])
        link = f'<a href="#stage-{stage}">{stage}</a>' if s["stage"] in linked else stage
        cells = [_td(link), _td(_e(s["kind"])), _outcome(s["outcome"]), _td(_e(s["status"]))]
        cells += [_td(_e(why(s))), _td(_e(took(s)), "num")]
        cells.append(_td(f"<code>{_e(s['key'] or '')}</code>"))
        rows.append(_tr(cells, bad=s["outcome"] in BAD_OUTCOMES))
    return _table(["stage", "kind", "outcome", "ran / reused", "why", "duration (s)", "key"], rows)


def _html_gates(report: dict[str, Any]) -> list[str]:
    gates = gate_rows(report)
    if not gates:
        return []
    rows = []
    for stage, g in gates:
        cells = [_td(_e(stage)), _td(f"<code>{_e(g['gate'])}</code>"), _td(_e(num(g["value"])), "num")]
        cells += [_td(_e(threshold(g))), _td(_e(gate_result(g)), "passed" if g["passed"] else "failed")]
        rows.append(_tr([*cells, _td(_e(g["where"]))], bad=not g["passed"]))
    return ["<h2>Gates</h2>", *_table(["stage", "gate", "measured", "threshold", "result", "where"], rows)]


def _html_hypotheses(report: dict[str, Any]) -> list[str]:
    hypotheses = report.get("hypotheses")
    if not hypotheses:
        return []
    earlier = f" From an earlier run, {hypotheses['earlier']}." if hypotheses.get("earlier") else ""
    out = [
        "<h2>Hypotheses</h2>",
        f"<p><strong>{_e(hypotheses['status'])}</strong>: {_e(hypotheses['reason'])}. "
        f"Details: {_link(hypotheses['report'], hypotheses['report'])}.{_e(earlier)}</p>",
    ]
    rows = []
    for h in hypotheses["results"]:
        cells = [_td(_e(h["id"])), _td(_e(h["verdict"])), _outcome(h["outcome"]), _td(_e(effect(h)))]
        cells += [_td(_e(num(h["p_value"])), "num"), _td(_e(num(h["p_adjusted"])), "num")]
        rows.append(_tr([*cells, _td(f"{h['alpha']:g}", "num")], bad=h["outcome"] == Outcome.FAILED))
    adjusted = f"adjusted p ({hypotheses['correction']})"
    return out + _table(["hypothesis", "verdict", "outcome", "effect [CI]", "p", adjusted, "alpha"], rows)


def _html_details(report: dict[str, Any], report_dir: Path) -> list[str]:
    """A section per stage with its metrics and its plots embedded."""
    detailed = detailed_stages(report)
    if not detailed:
        return []
    out = ["<h2>Stage details</h2>"]
    for s in detailed:
        out += [f'<section id="stage-{_e(s["stage"])}">', f"<h3>{_e(s['stage'])}</h3>"]
        if s.get("description"):
            out.append(f'<p class="description">{_e(s["description"])}</p>')
        if s.get("analyses"):
            out.append("<p>Analyses: " + ", ".join(_link(Path(p).name, p) for p in s["analyses"]) + "</p>")
        if s["metrics"]:
            rows = [_tr([_td(_e(k)), _td(_e(metric(v)))]) for k, v in s["metrics"].items()]
            out += _table(["metric", "value"], rows)
        out += [_figure(s["stage"], plot, report_dir) for plot in s["plots"]]
        out.append("</section>")
    return out
