"""Collection time and memory of hostile and largest-allowed specs.

    python benchmarks/bench_hostile_specs.py [--repeats N]

For each spec, `load_plan` (collection without the checks of this machine: YAML with
line marks, includes, profiles, schema and static checks) against plain `yaml.safe_load`
of the same file (what a script reading specs would use), in the same run: median wall
time, and the tracemalloc peak of one more call (tracemalloc slows Python down several
times). Bombs are refused by the harness; safe_load builds them with shared references
(cheap), but anything walking the result (json.dumps, a deep copy) pays for every path,
so the "walk" column times `json.dumps` of safe_load's value, cut off after 10 s.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import yaml

from harness.core.experiment import load_plan
from harness.spec.errors import SpecError

SHIPPED = ("cubic_gravity.yaml", "persona_em.yaml")


def laughs(levels: int) -> str:
    lines = ['l0: &l0 "lol"']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\nexperiment: bomb\nstages: {a: {kind: python}}\n"


def largest(stages: int, profiles: int, gates: int, hypotheses: int) -> str:
    """A spec at the schema's bounds: python stages with gates, profiles, hypotheses."""
    out = ["experiment: largest", "stages:"]
    for i in range(stages):
        out.append(f"  s{i}:\n    kind: python\n    params: {{function: 'steps.x:f', metrics: [m]}}")
        out += ["    gates:"] + [f"      - m > {g}" for g in range(gates)] if gates else []
    out.append("hypotheses:\n  tests:" if hypotheses else "")
    for h in range(hypotheses):
        out.append(
            f"    h{h}:\n      claim: c\n      metric: m\n      test: bootstrap\n      direction: greater\n"
            "      alpha: 0.05\n      a: {stage: s0, samples: x}\n      b: {stage: s1, samples: y}"
        )
    out.append("profiles:")
    out += [f"  p{p}:\n    seed: {p}" for p in range(profiles)]
    return "\n".join(out) + "\n"


def measure(fn: Callable[[], object], repeats: int) -> tuple[float, float, str]:
    """Median seconds, then the peak MiB of one more call under tracemalloc, and the outcome."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        outcome = _outcome(fn)
        times.append(time.perf_counter() - started)
    tracemalloc.start()
    _outcome(fn)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return statistics.median(times), peak / 2**20, outcome


def _outcome(fn: Callable[[], object]) -> str:
    try:
        fn()
        return "accepted"
    except SpecError as error:
        return "refused: " + str(error).splitlines()[0].split(": ", 2)[-1][:60]


def _dump(text: str) -> None:
    json.dumps(yaml.safe_load(text))


def walk_seconds(text: str, limit: float = 10.0) -> str:
    """json.dumps of safe_load's value in a child process, killed after `limit` seconds."""
    process = multiprocessing.Process(target=_dump, args=(text,))
    started = time.perf_counter()
    process.start()
    process.join(limit)
    if process.is_alive():
        process.kill()
        process.join()
        return f"> {limit:.0f} s"
    return f"{time.perf_counter() - started:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    repo = Path(__file__).resolve().parent.parent
    shipped = {f"{name} (shipped)": repo / "experiments" / name for name in SHIPPED}
    specs = {
        "largest allowed (256 stages x 4 gates, 16 profiles, 64 hypotheses)": largest(256, 16, 4, 64),
        "largest allowed (128 stages x 32 gates, 16 profiles)": largest(128, 16, 32, 0),
        "alias bomb, 5 levels": laughs(5),
        "alias bomb, 9 levels (billion laughs)": laughs(9),
    }
    print(f"python {platform.python_version()}, PyYAML {yaml.__version__}, {args.repeats} repeats (median)")
    print(f"| spec | bytes | harness | MiB | outcome | safe_load | MiB | walk |\n|{'---|' * 8}")
    with tempfile.TemporaryDirectory() as tmp:
        for index, text in enumerate(specs.values()):
            (Path(tmp) / f"spec{index}.yaml").write_text(text)
        paths = {**shipped, **{title: Path(tmp) / f"spec{i}.yaml" for i, title in enumerate(specs)}}
        for title, path in paths.items():
            text = path.read_text()
            ours, ours_mib, outcome = measure(lambda p=path: load_plan(p, None), args.repeats)
            plain, plain_mib, _ = measure(lambda t=text: yaml.safe_load(t), args.repeats)
            print(
                f"| {title} | {len(text.encode())} | {ours:.3f} s | {ours_mib:.1f} | {outcome} | "
                f"{plain:.3f} s | {plain_mib:.1f} | {walk_seconds(text)} |"
            )


if __name__ == "__main__":
    main()
