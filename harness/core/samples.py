"""`samples.json`: the sample sets a stage writes for hypotheses, with their replication unit.

A stage that backs hypotheses writes `samples.json` at the top of its artifact directory:

    {"<set>": {"values": [v, ...], "units": ["<unit of v>", ...], "level": "training run"}, ...}

`units[i]` names the independent replicate that value `i` came from: the training run
(e.g. the EM adapter's stage) for answers of a fine-tuned model, the answer itself for
answers of one fixed model with the questions held fixed, or the question when the
questions are taken as drawn, ... Values that share a unit are not independent: hypothesis
tests resample units, never values across units. `level` says in words what one unit is,
for the reports (default "value"). A set written as a plain list of numbers means every
value is its own unit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SAMPLES_FILE = "samples.json"


@dataclass(frozen=True)
class SampleSet:
    values: tuple[float, ...]
    units: tuple[str, ...]  # one per value
    level: str = "value"  # what one unit is, in words

    def __post_init__(self) -> None:
        if len(self.values) != len(self.units):
            raise ValueError(f"{len(self.values)} values but {len(self.units)} units")

    @classmethod
    def independent(cls, values: Sequence[float], level: str = "value") -> SampleSet:
        """Every value its own unit."""
        return cls(tuple(float(v) for v in values), tuple(str(i) for i in range(len(values))), level)

    @property
    def unit_names(self) -> list[str]:
        """The distinct units, in first-seen order."""
        return list(dict.fromkeys(self.units))

    def by_unit(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {u: [] for u in self.unit_names}
        for value, unit in zip(self.values, self.units, strict=True):
            out[unit].append(value)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"values": list(self.values), "units": list(self.units), "level": self.level}


def parse_set(data: Any, name: str) -> SampleSet:
    """One set as written in samples.json; ValueError naming the set if it is malformed."""
    level = "value"
    if isinstance(data, Mapping):
        values, units, level = data.get("values"), data.get("units"), data.get("level", level)
        if not isinstance(values, list) or not isinstance(units, list):
            raise ValueError(f"set {name!r} needs lists `values` and `units`")
        if not isinstance(level, str) or not level:
            raise ValueError(f"set {name!r}: `level` names what one unit is, in words (e.g. 'training run')")
    elif isinstance(data, list):
        values, units = data, [str(i) for i in range(len(data))]
    else:
        raise ValueError(f"set {name!r} is neither a list of numbers nor {{values, units}}")
    if not values:
        raise ValueError(f"set {name!r} is empty")
    bad = [
        v for v in values if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
    ]
    if bad:
        raise ValueError(f"set {name!r} holds non-numbers or non-finite values, e.g. {bad[0]!r}")
    if len(units) != len(values):
        raise ValueError(f"set {name!r} has {len(values)} values but {len(units)} units")
    return SampleSet(tuple(float(v) for v in values), tuple(str(u) for u in units), level)


def write_samples(path: Path, sets: Mapping[str, SampleSet]) -> None:
    from harness.core.store import write_json

    write_json(Path(path), {name: s.to_json() for name, s in sets.items()})
