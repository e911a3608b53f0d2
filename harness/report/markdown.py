"""report.md and hypothesis_report.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from harness.report.text import (
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


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _link(label: str, path: str) -> str:
    # percent-encoded so that names with spaces or parentheses still make a link
    escaped = label.replace("[", "\\[").replace("]", "\\]")
    return f"[{escaped}]({quote(path)})"


def markdown(report: dict[str, Any]) -> str:
    sections = (
        _md_title(report),
        _md_headline(report),
        _md_stages(report),
        _md_gates(report),
        _md_aggregates(report),
        _md_hypotheses(report),
        _md_details(report),
    )
    return "\n".join(line for section in sections for line in section).rstrip() + "\n"


def _md_title(report: dict[str, Any]) -> list[str]:
    out = [f"# {report['experiment']} — profile `{report['profile']}`", ""]
    if report.get("rehearsal"):
        out += [f"> {line}  " for line in rehearsal(report)] + [""]
    if report["description"]:
        out += [report["description"], ""]
    return out + [
        f"Spec: `{report['spec_file']}`  ",
        f"Generated: {report['generated_at']}  ",
        f"Stages: {counts(report['summary'])}  ",
        this_run(report),
    ]


def _md_headline(report: dict[str, Any]) -> list[str]:
    """What the run shows: every gate, the hypotheses' verdicts, the metrics the gates read
    and the written analyses."""
    out = ["", "## Headline", ""]
    gates = gate_rows(report)
    if gates:
        out += [f"{gate_count(report)}:", ""]
        for stage, g in gates:
            mark = "✓" if g["passed"] else "✗"
            out.append(f"- {mark} {stage}: `{g['gate']}` — measured {num(g['value'])} ({gate_result(g)})")
    else:
        out.append("No gates.")
    hypotheses = report.get("hypotheses")
    if hypotheses:
        verdicts = ", ".join(f"{h['id']} {h['verdict']}" for h in hypotheses["results"]) or "none evaluated"
        out += ["", f"Hypotheses ({hypotheses['status']}): {verdicts}."]
    metrics = headline_metrics(report)
    if metrics:
        out += [
            "",
            "Headline metrics (the metrics the gates read):",
            "",
            "| stage | metric | value |",
            "|---|---|---|",
        ]
        out += [f"| {stage} | {_cell(name)} | {_cell(metric(value))} |" for stage, name, value in metrics]
    links = analyses(report)
    if links:
        out += ["", "Analyses: " + ", ".join(_link(label, path) for label, path in links)]
    return out


def _md_stages(report: dict[str, Any]) -> list[str]:
    """One row per stage."""
    out = [
        "",
        "## Stages",
        "",
        "| stage | kind | outcome | ran / reused | why | duration (s) | key |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in report["stages"]:
        out.append(
            f"| {s['stage']} | {s['kind']} | {s['outcome']} | {s['status']} | {_cell(why(s))} "
            f"| {took(s)} | `{s['key'] or ''}` |"
        )
    return out


def _md_aggregates(report: dict[str, Any]) -> list[str]:
    rows = report["aggregates"]
    if not rows:
        return []
    out = [
        "",
        "## Replicates (stages that differ only by seed)",
        "",
        "| stages | metric | n | mean ± sd | per stage |",
        "|---|---|---|---|---|",
    ]
    for a in rows:
        cells = [_cell(a["group"]), _cell(a["metric"]), str(a["n"]), mean_sd(a), _cell(per_stage(a))]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _md_gates(report: dict[str, Any]) -> list[str]:
    gates = gate_rows(report)
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
        cells = [stage, f"`{_cell(g['gate'])}`", num(g["value"]), threshold(g), _cell(gate_result(g))]
        out.append("| " + " | ".join([*cells, g["where"]]) + " |")
    return out


def _md_hypotheses(report: dict[str, Any]) -> list[str]:
    hypotheses = report.get("hypotheses")
    if not hypotheses:
        return []
    earlier = f" From an earlier run, {hypotheses['earlier']}." if hypotheses.get("earlier") else ""
    out = [
        "",
        "## Hypotheses",
        "",
        f"**{hypotheses['status']}**: {_cell(hypotheses['reason'])}. "
        f"Details: [{hypotheses['report']}]({hypotheses['report']}).{earlier}",
        "",
        "| hypothesis | verdict | outcome | effect [CI] | p "
        f"| adjusted p ({hypotheses['correction']}) | alpha |",
        "|---|---|---|---|---|---|---|",
    ]
    for h in hypotheses["results"]:
        cells = [h["id"], h["verdict"], h["outcome"], effect(h), num(h["p_value"]), num(h["p_adjusted"])]
        out.append("| " + " | ".join([*cells, f"{h['alpha']:g}"]) + " |")
    return out


def _md_details(report: dict[str, Any]) -> list[str]:
    """Each stage's metrics and links to its plots."""
    detailed = detailed_stages(report)
    if not detailed:
        return []
    out = ["", "## Stage details", ""]
    for s in detailed:
        out += [f"### {s['stage']}", ""]
        if s.get("description"):
            out += [s["description"], ""]
        if s.get("analyses"):
            out += ["Analyses: " + ", ".join(_link(Path(p).name, p) for p in s["analyses"]), ""]
        if s["metrics"]:
            out += ["| metric | value |", "|---|---|"]
            out += [f"| {_cell(name)} | {_cell(metric(v))} |" for name, v in s["metrics"].items()]
            out.append("")
        for plot in s["plots"]:
            out += ["!" + _link(f"{s['stage']}: {Path(plot).name}", plot), ""]
    return out


# -- hypothesis_report.md ----------------------------------------------------------------


def _claimed(h: dict[str, Any]) -> str:
    """The claimed alternative (evaluation's `claimed`), saying what a margin means."""
    margin = h.get("margin") or 0
    return f"{h['claimed']} (a margin: the null is contrast = {margin:g})" if margin else h["claimed"]


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
        cells = [h["id"], _cell(h["metric"]), f"**{h['verdict']}**", h["outcome"], effect(h)]
        cells += [num(h["p_value"]), num(h["p_adjusted"]), f"{h['alpha']:g}", h["status"]]
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
                means = ", ".join(f"{u}: {num(m)}" for u, m in (s["unit_means"] or {}).items()) or "(many)"
                cells = [
                    f"`{s['stage']}` {_code(s['samples'])}",
                    f"{s['weight']:+g}",
                    num(s["mean"]),
                    str(s["n_units"]),
                    _cell(s["level"]),
                    str(s["n_values"]),
                    _cell(means),
                ]
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
        out += [
            f"- test: {h['test']}{exact}, {h['n_resamples']} resamples, resampling {h['resampling']}; "
            f"direction {h['direction']} ({_claimed(h)}), alpha {h['alpha']:g}",
            f"- power: {h['power'] or 'the test can reach alpha at these numbers of units'}",
            f"- effect (the contrast): {effect(h)} ({h['confidence']:.0%} CI)",
            f"- p: {num(h['p_value'])}; adjusted ({h['correction']}, {h['family_size']} hypotheses): "
            f"{num(h['p_adjusted'])}",
            f"- verdict: **{h['verdict']}** — {h['why']}",
            f"- item: {h['outcome']}; {h['status']}",
        ]
    return "\n".join(out).rstrip() + "\n"
