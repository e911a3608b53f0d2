"""runs/index.md (and .html, .json): every experiment's latest gates and headline metrics, per
profile, read from each run directory's report.json (`<runs>/<experiment>/<profile>/`).

The headline metrics are the ones the gates read, shown with their CIs where they have one;
a gate that a profile does not have, or a stage it did not run, is left blank.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.core.stage import StageError
from harness.core.store import read_json, write_json, write_text_atomic
from harness.report.text import counts, gate_result, metric, num

INDEX = "index"


def collect(runs_dir: Path) -> dict[str, Any]:
    """The index as JSON: per experiment, its profiles' runs and a row per gate."""
    if not runs_dir.is_dir():
        raise StageError(f"{runs_dir}: no such runs directory (give --runs-dir)")
    experiments = []
    for experiment_dir in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        reports = {}
        for profile_dir in sorted(p for p in experiment_dir.iterdir() if p.is_dir()):
            report = read_json(profile_dir / "report.json")
            if isinstance(report, dict) and "stages" in report:
                reports[profile_dir.name] = report
        if reports:
            experiments.append(_experiment(experiment_dir.name, reports))
    return {
        "runs_dir": str(runs_dir),
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "experiments": experiments,
    }


def _experiment(name: str, reports: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    profiles = {
        profile: {
            "report": f"{name}/{profile}/report.md",
            "generated_at": report.get("generated_at"),
            "summary": report.get("summary", {}),
            "gates_passed": sum(g["passed"] for s in report["stages"] for g in s["gates"]),
            "gates": sum(len(s["gates"]) for s in report["stages"]),
        }
        for profile, report in reports.items()
    }
    rows: dict[tuple[str, str], dict[str, Any]] = {}  # by (stage, gate), in the reports' order
    for profile, report in reports.items():
        for stage in report["stages"]:
            for gate in stage["gates"]:
                row = rows.setdefault(
                    (stage["stage"], gate["gate"]),
                    {"stage": stage["stage"], "gate": gate["gate"], "profiles": {}},
                )
                row["profiles"][profile] = {
                    "outcome": gate_result(gate),
                    "passed": gate["passed"],
                    "measured": gate["value"],
                    "metric": gate["metric"],
                    "headline": stage["metrics"].get(_metric_name(gate["metric"])),
                    "earlier": stage.get("earlier"),  # a row a partial run kept: when it last ran
                }
    return {"experiment": name, "profiles": profiles, "gates": list(rows.values())}


def _metric_name(subject: str) -> str:
    """The metric a gate's subject shows: `ci_low(auc)` shows auc, with its interval."""
    return subject.partition("(")[2].rstrip(")") if subject.endswith(")") else subject


def write_index(runs_dir: Path) -> dict[str, Path]:
    """Write index.json, index.md and index.html into the runs directory; returns their paths."""
    index = collect(runs_dir)
    paths = {ext: runs_dir / f"{INDEX}.{ext}" for ext in ("json", "md", "html")}
    write_json(paths["json"], index)
    write_text_atomic(paths["md"], to_markdown(index))
    write_text_atomic(paths["html"], to_html(index))
    return paths


def _tables(index: Mapping[str, Any]) -> Iterable[tuple[str, dict[str, Any], list[str], list[list[str]]]]:
    """(title, reports to link by profile, header, rows) of each table, in text: markdown and
    HTML render the same cells."""
    yield (
        "Runs",
        {},
        ["experiment", "profile", "gates passed", "stages", "last report"],
        [
            [
                e["experiment"],
                p,
                f"{r['gates_passed']}/{r['gates']}",
                counts(r["summary"]),
                r["generated_at"] or "",
            ]
            for e in index["experiments"]
            for p, r in e["profiles"].items()
        ],
    )
    for e in index["experiments"]:
        profiles = list(e["profiles"])
        yield (
            e["experiment"],
            e["profiles"],
            ["stage", "gate", *profiles],
            [[g["stage"], g["gate"], *(_cell(g["profiles"].get(p)) for p in profiles)] for g in e["gates"]],
        )


def _cell(result: Mapping[str, Any] | None) -> str:
    if result is None:
        return ""
    headline = result["headline"]
    shown = metric(headline) if headline is not None else num(result["measured"])
    earlier = f" (earlier run, {result['earlier']})" if result.get("earlier") else ""
    return f"{result['outcome']}: {shown}{earlier}"


def to_markdown(index: Mapping[str, Any]) -> str:
    lines = [f"# Results across experiments ({index['generated_at']})", ""]
    for title, links, header, rows in _tables(index):
        lines += [f"## {title}", ""]
        if links:
            lines += [" · ".join(f"[{p}]({r['report']})" for p, r in links.items()), ""]
        if not rows:
            lines += ["none", ""]
            continue
        lines += [_md_row(header), _md_row(["---"] * len(header)), *map(_md_row, rows), ""]
    return "\n".join(lines)


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def to_html(index: Mapping[str, Any]) -> str:
    parts = [
        "<!doctype html><meta charset='utf-8'><title>harness results</title>",
        "<style>body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.25em .6em}"
        "th{background:#f3f3f3}.passed{color:#1a7f37}.bad{color:#c62828;font-weight:600}</style>",
        f"<h1>Results across experiments</h1><p>{html.escape(index['generated_at'])}</p>",
    ]
    for title, links, header, rows in _tables(index):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if links:
            parts.append(
                "<p>"
                + " · ".join(
                    f"<a href='{html.escape(r['report'].replace('.md', '.html'))}'>{html.escape(p)}</a>"
                    for p, r in links.items()
                )
                + "</p>"
            )
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(_html_cell(c) for c in row) + "</tr>" for row in rows)
        parts.append(f"<table><tr>{head}</tr>{body}</table>")
    return "\n".join(parts) + "\n"


def _html_cell(text: str) -> str:
    cls = "passed" if text.startswith("passed") else "bad" if text.startswith(("FAILED", "ABORT")) else ""
    return f"<td class='{cls}'>{html.escape(text)}</td>" if cls else f"<td>{html.escape(text)}</td>"
