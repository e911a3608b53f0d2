"""Text every report format shares: numbers, metrics, gates, outcomes, effects."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from harness.core.outcomes import Outcome, Status

BAD_OUTCOMES = (Outcome.FAILED, Outcome.ERROR, Outcome.ABORTED)
LIST_ENDS = 3  # a metric list longer than twice this shows only its ends


def counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


def how(stage: dict[str, Any]) -> str:
    if stage["status"] in (Status.RAN, Status.REUSED):
        took = f" in {stage['duration_s']:.2f}s" if stage["status"] == Status.RAN else ""
        return f"{stage['status']}{took} ({stage['reason']})"
    return stage["reason"]


def num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


def metric(value: Any) -> str:
    if isinstance(value, dict) and "value" in value:
        ci = f" [{num(value.get('ci_low'))}, {num(value.get('ci_high'))}]" if "ci_low" in value else ""
        return num(value["value"]) + ci
    if isinstance(value, list):  # e.g. a loss curve: the ends and the length, the whole is in report.json
        if len(value) <= 2 * LIST_ENDS:
            return "[" + ", ".join(num(v) for v in value) + "]"
        head = ", ".join(num(v) for v in value[:LIST_ENDS])
        tail = ", ".join(num(v) for v in value[-LIST_ENDS:])
        return f"[{head}, …, {tail}] ({len(value)} values)"
    return num(value)


def effect(h: dict[str, Any]) -> str:
    if h["effect"] is None:
        return "n/a"
    return f"{num(h['effect'])} [{num(h['ci_low'])}, {num(h['ci_high'])}]"


def hypothesis_numbers(h: dict[str, Any]) -> str:
    if h["p_value"] is None:
        return h["why"]
    return (
        f"effect {effect(h)}, p {num(h['p_value'])}, {h['correction']} p {num(h['p_adjusted'])}, "
        f"alpha {h['alpha']:g}"
    )


def threshold(gate: dict[str, Any]) -> str:
    return f"{gate['op']} {gate['threshold']:g}" + (f" (abort {gate['abort']})" if gate["abort"] else "")


def gate_result(gate: dict[str, Any]) -> str:
    result = "passed" if gate["passed"] else "ABORT" if gate["aborted"] else "FAILED"
    return result + (f": {gate['problem']}" if gate["problem"] else "")


def gate_rows(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(s["stage"], g) for s in report["stages"] for g in s["gates"]]


def detailed_stages(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The stages with a description, metrics, plots or analyses to show."""
    return [
        s for s in report["stages"] if s.get("description") or s["metrics"] or s["plots"] or s.get("analyses")
    ]


def took(stage: dict[str, Any]) -> str:
    """How long the stage took: this run's time, or for a reused or kept row the time of the
    run it reuses, when the store has it."""
    if stage["status"] != Status.RAN and stage.get("ran_for_s") is not None:
        return f"{stage['ran_for_s']:.2f} when it ran"
    return f"{stage['duration_s']:.2f}"


def why(stage: dict[str, Any]) -> str:
    earlier = stage.get("earlier")
    return f"from an earlier run, {earlier}: {stage['reason']}" if earlier else stage["reason"]


def this_run(report: dict[str, Any]) -> str:
    """Which stages this run resolved, and whether the other rows come from earlier runs."""
    run = report["run"]
    executed, total = run["executed"], run["stages_in_spec"]
    if not run["partial"]:
        return f"This run: all {total} stages of the spec."
    kept = sum(1 for s in report["stages"] if s.get("earlier"))
    return (
        f"This run: {len(executed)} of {total} stages ({', '.join(executed) or 'none'}); "
        f"{kept} {'row comes' if kept == 1 else 'rows come'} from earlier runs (marked)."
    )


def rehearsal(report: dict[str, Any]) -> list[str]:
    """What a rehearsal replaced (harness.rehearsal), in words; none for a real run."""
    record = report.get("rehearsal")
    if not record:
        return []
    lines = [
        "REHEARSAL: random stand-in models and scripted API answers; its numbers mean nothing, and its "
        "gates and hypotheses are reported, not required."
    ]
    for base, what in record["bases"].items():
        lines.append(f"{base} -> {what['stand_in']} ({', '.join(what['stages'])})")
    lines += [f"{p['stage']}.{p['param']}: {p['was']} -> scripted server" for p in record["providers"]]
    sizes = ", ".join(f"{s['stage']}.{s['param']} {s['was']} -> {s['now']}" for s in record["sizes"])
    return lines + ([f"sizes x{record['scale']:g}: {sizes}"] if sizes else [])


def gate_count(report: dict[str, Any]) -> str:
    gates = [g for _, g in gate_rows(report)]
    return f"{sum(g['passed'] for g in gates)} of {len(gates)} gates hold"


def headline_metrics(report: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """The metrics the gates read: (stage, metric, value), in report order, each once."""
    out = []
    for s in report["stages"]:
        read = {name for g in s["gates"] for name in re.findall(r"[\w.]+", g["metric"])}
        out += [(s["stage"], name, value) for name, value in s["metrics"].items() if name in read]
    return out


def analyses(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, path relative to the report) of every written analysis: the hypothesis report,
    then each stage's analysis files."""
    out = []
    if report.get("hypotheses"):
        out.append(("hypotheses", report["hypotheses"]["report"]))
    for s in report["stages"]:
        out += [(f"{s['stage']}: {Path(path).name}", path) for path in s.get("analyses", [])]
    return out


def mean_sd(row: dict[str, Any]) -> str:
    return f"{num(row['mean'])} ± {num(row['sd'])}"


def per_stage(row: dict[str, Any]) -> str:
    return ", ".join(f"{stage}: {num(value)}" for stage, value in row["values"].items())
