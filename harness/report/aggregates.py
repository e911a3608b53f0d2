"""Aggregates over replicates: the stages of a run whose recipes differ only by seed.

Two stages are replicates when their recipes (from the manifests' key material) agree on
kind, code version, params and inputs, and the stages they need are, role by role,
replicates or the same stage: `em[none,2026]` and `em[none,2027]` of a matrix with a
seed axis, `em` and `em_s2` written twice with other seeds, and the stages downstream
of them that differ only through them. A group of two or more with different keys gets,
for every number its stages all report, the mean, the sample standard deviation and the
value of each stage.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.core.store import MANIFEST, read_json

_MATRIX_NAME = re.compile(r"(?P<name>[^\[\]]+)\[(?P<values>[^\[\]]*)\]")


def manifest_of(stage: Mapping[str, Any]) -> dict[str, Any] | None:
    """The manifest of a report row's run in the store, if it finished."""
    manifest = read_json(Path(stage["dir"]) / MANIFEST) if stage.get("dir") else None
    return manifest if isinstance(manifest, dict) and manifest.get("complete") else None


def number(value: Any) -> float | None:
    """A metric as one number: a plain number or the `value` of a {value, ci_low, ci_high}."""
    if isinstance(value, dict):
        value = value.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def replicate_groups(stages: list[Mapping[str, Any]]) -> list[list[str]]:
    """The names of the stages that are replicates of each other, in groups of two or more,
    in report order."""
    materials = {}
    for stage in stages:
        manifest = manifest_of(stage)
        if manifest and isinstance(manifest.get("key_material"), dict):
            materials[stage["stage"]] = manifest["key_material"]
    signatures: dict[str, str] = {}

    def signature(name: str) -> str:
        if name not in signatures:
            material = materials[name]
            upstream = {
                role: signature(up["stage"]) if up["stage"] in materials else up["key"]
                for role, up in material.get("upstream", {}).items()
            }
            unseeded = {k: v for k, v in material.items() if k not in ("seed", "upstream")}
            signatures[name] = json.dumps([unseeded, upstream], sort_keys=True)
        return signatures[name]

    groups: dict[str, list[str]] = {}
    for name in materials:
        groups.setdefault(signature(name), []).append(name)
    keys = {s["stage"]: s.get("key") for s in stages}
    return [names for names in groups.values() if len({keys[n] for n in names}) > 1]


def group_label(names: list[str]) -> str:
    """`em[none,*]` for stages of one matrix that differ in some values, else the names."""
    found = [_MATRIX_NAME.fullmatch(n) for n in names]
    if all(found) and len({f["name"] for f in found}) == 1:
        rows = [f["values"].split(",") for f in found]
        if len({len(r) for r in rows}) == 1:
            values = [c[0] if len(set(c)) == 1 else "*" for c in zip(*rows, strict=True)]
            return f"{found[0]['name']}[{','.join(values)}]"
    return ", ".join(names)


def aggregates(stages: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per replicate group and metric that every stage of the group reports as a number."""
    by_name = {s["stage"]: s for s in stages}
    rows = []
    for names in replicate_groups(stages):
        metrics = [by_name[n]["metrics"] for n in names]
        for metric in metrics[0]:
            values = {n: number(m.get(metric)) for n, m in zip(names, metrics, strict=True)}
            if any(v is None for v in values.values()):
                continue
            numbers = list(values.values())
            rows.append(
                {
                    "group": group_label(names),
                    "stages": names,
                    "metric": metric,
                    "n": len(numbers),
                    "mean": statistics.fmean(numbers),
                    "sd": statistics.stdev(numbers),
                    "values": values,
                }
            )
    return rows
