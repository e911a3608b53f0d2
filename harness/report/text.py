"""Text every report format shares: numbers, metrics, gates, outcomes, effects."""

from __future__ import annotations

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
    """The stages with metrics or plots to show."""
    return [s for s in report["stages"] if s["metrics"] or s["plots"]]
