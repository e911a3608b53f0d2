"""report.html: one self-contained page, plots embedded."""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from harness.core.outcomes import Outcome
from harness.report.text import (
    BAD_OUTCOMES,
    counts,
    detailed_stages,
    effect,
    gate_result,
    gate_rows,
    metric,
    num,
    threshold,
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
        f'Stages: <span class="{"failed" if bad else "passed"}">{_e(counts(report["summary"]))}</span></p>',
    ]


def _html_stages(report: dict[str, Any]) -> list[str]:
    """One row per stage; a stage with metrics or plots links to its section."""
    linked = {s["stage"] for s in detailed_stages(report)}
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
    out = [
        "<h2>Hypotheses</h2>",
        f"<p><strong>{_e(hypotheses['status'])}</strong>: {_e(hypotheses['reason'])}. "
        f'Details: <a href="{_e(hypotheses["report"])}">{_e(hypotheses["report"])}</a></p>',
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
    out = ["<h2>Metrics and plots</h2>"]
    for s in detailed:
        out += [f'<section id="stage-{_e(s["stage"])}">', f"<h3>{_e(s['stage'])}</h3>"]
        if s["metrics"]:
            rows = [_tr([_td(_e(k)), _td(_e(metric(v)))]) for k, v in s["metrics"].items()]
            out += _table(["metric", "value"], rows)
        out += [_figure(s["stage"], plot, report_dir) for plot in s["plots"]]
        out.append("</section>")
    return out
