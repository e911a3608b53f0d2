"""`replicates`: the mean, spread and confidence interval of metrics over the stages it
needs, run as replicates (typically a matrix's seed axis: `needs: ["em[none,*]"]`), so
that gates can read the aggregate: `loss_drop > 0` on the mean, `ci_low(loss_drop) > 0`,
`loss_drop.sd < 0.05`.

The interval is Student's t over the replicates (the unit that was replicated is the
training run, not an answer); with two replicates it is wide, and with one it is absent."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from typing import Any

from scipy import stats

from harness.api import stage_kind
from harness.core.stage import StageContext, StageError
from harness.core.store import write_json

PARTS = ("sd", "min", "max", "n")


def _metrics(params: Mapping[str, Any]) -> list[str]:
    return [m for name in params.get("metrics", []) for m in (name, *(f"{name}.{p}" for p in PARTS))]


def _number(value: Any) -> float | None:
    """A metric's value: a number, or the `value` of a `{value, ci_low, ci_high}` mapping."""
    if isinstance(value, Mapping):
        value = value.get("value")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def aggregate(values: list[float], confidence: float) -> dict[str, Any]:
    """Mean with a t interval, sd, min, max and n of replicate values."""
    n = len(values)
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if n > 1 else None
    half = stats.t.ppf((1 + confidence) / 2, n - 1) * sd / math.sqrt(n) if sd is not None else None
    return {
        "value": mean,
        "ci_low": None if half is None else mean - half,
        "ci_high": None if half is None else mean + half,
        "sd": sd,
        "min": min(values),
        "max": max(values),
        "n": n,
    }


@stage_kind(metrics=_metrics)
def run(ctx: StageContext) -> Mapping[str, Any]:
    if not ctx.upstream:
        raise StageError("a replicates stage needs the stages it pools (e.g. needs: ['em[none,*]'])")
    confidence = ctx.params.get("confidence", 0.95)
    metrics: dict[str, Any] = {}
    per_replicate: dict[str, dict[str, float]] = {}
    for name in ctx.params["metrics"]:
        values = {up.name: _number(up.metrics.get(name)) for up in ctx.upstream.values()}
        missing = sorted(stage for stage, value in values.items() if value is None)
        if missing:
            raise StageError(f"metric {name!r} is not a number in {', '.join(missing)}")
        per_replicate[name] = values
        summary = aggregate(list(values.values()), confidence)
        metrics[name] = {part: summary[part] for part in ("value", "ci_low", "ci_high")}
        metrics.update({f"{name}.{part}": summary[part] for part in PARTS})
    write_json(
        ctx.out_dir / "replicates.json",
        {"confidence": confidence, "interval": "Student's t over replicates", "values": per_replicate},
    )
    ctx.log(
        ", ".join(f"{name} {metrics[name]['value']:.4g} (n={metrics[name + '.n']})" for name in per_replicate)
    )
    return metrics
