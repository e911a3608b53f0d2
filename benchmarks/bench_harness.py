"""Benchmarks of the harness's own overhead: spec collection/validation and no-op reruns.

    python benchmarks/bench_harness.py [--repeats N] [--specs N] [--keep]

Everything is generated in a temporary directory; each figure is measured against a
baseline taken in the same run (a plain pytest run of trivial test files), so that
pytest's and Python's own startup are separated out. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.core.execution import ExperimentRun
from harness.core.experiment import load_experiment
from harness.core.outcomes import Status

TARGET_RERUN_OVERHEAD_S = 1.0
PYTEST = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
PYTEST_INI = "[pytest]\nharness_runs_dir = runs\n"

STEP_MODULE = '''\
"""Trivial steps for the benchmark specs."""


def step(ctx):
    args = ctx.params.get("args", {})
    (ctx.out_dir / "out.txt").write_text(f"{ctx.stage} {args}\\n")
    n = len(ctx.upstream) + 1
    return {"value": {"value": float(n), "ci_low": n - 0.5, "ci_high": n + 0.5}, "count": n}
'''

FRAGMENT = """\
# Shared by some benchmark specs through `include:`.
seed: 5
description: shares a prep stage
stages:
  prep:
    kind: python
    params:
      function: bench_steps:step
      args: {source: shared}
      metrics: [value, count]
    gates:
      - count >= 1 (abort < 0)
"""


# --- helpers -------------------------------------------------------------------------------


def pytest_cmd(cwd: Path, *args: str, ok: tuple[int, ...] = (0,)) -> tuple[float, str]:
    """Run pytest in a subprocess; returns (wall seconds, output). Fails loudly on errors."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    start = time.perf_counter()
    proc = subprocess.run([*PYTEST, *args], cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode not in ok:
        sys.exit(f"pytest {' '.join(args)} in {cwd} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return wall, proc.stdout


def collected(output: str) -> int:
    match = re.search(r"(\d+) tests? collected", output)
    return int(match.group(1)) if match else 0


def write_project(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "pytest.ini").write_text(PYTEST_INI)  # makes root the rootdir; no repo conftest/ini
    return root


def trivial_tests(path: Path, n: int) -> None:
    path.write_text("".join(f"def test_{i}():\n    assert True\n\n\n" for i in range(n)))


class Row:
    def __init__(self, name: str, samples: list[float], scale: float = 1.0, unit: str = "s", note: str = ""):
        self.name, self.samples, self.scale, self.unit, self.note = name, samples, scale, unit, note

    @property
    def median(self) -> float:
        return statistics.median(self.samples) * self.scale


def fmt(value: float, unit: str) -> str:
    return f"{value * 1000:9.2f} ms" if unit == "ms" else f"{value:9.3f} s "


def print_table(title: str, rows: list[Row]) -> None:
    print(f"\n{title}")
    width = max(len(r.name) for r in rows)
    print(f"  {'measurement':<{width}}  {'median':>12}  {'min':>12}  {'n':>3}  note")
    for r in rows:
        lo = min(r.samples) * r.scale
        print(
            f"  {r.name:<{width}}  {fmt(r.median, r.unit):>12}  {fmt(lo, r.unit):>12}  "
            f"{len(r.samples):>3}  {r.note}"
        )


def alternate(repeats: int, runs: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Time each callable `repeats` times, interleaved so drift affects them alike."""
    out: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            out[name].append(run())
    return out


# --- 1. collection and validation of many specs ---------------------------------------------


def generate_specs(exp_dir: Path, count: int) -> int:
    """`count` distinct valid specs with 3-10 python stages each; returns the total stage count."""
    exp_dir.mkdir(parents=True)
    (exp_dir / "bench_steps.py").write_text(STEP_MODULE)
    (exp_dir / "fragments").mkdir()
    (exp_dir / "fragments" / "shared.yaml").write_text(FRAGMENT)
    total = 0
    for i in range(count):
        rng = random.Random(i)
        n = 3 + i % 8
        shared = i % 3 == 0
        lines = [f"experiment: bench_{i:03d}", f"description: generated spec {i}"]
        if shared:
            lines.append("include: fragments/shared.yaml")
        else:
            lines.append(f"seed: {i}")
        lines.append("stages:")
        for k in range(n):
            lines += [f"  s{k}:", "    kind: python", f"    description: stage {k} of spec {i}"]
            earlier = (["prep"] if shared else []) + [f"s{j}" for j in range(k)]
            if earlier:  # the previous stage, and up to two others
                picks = sorted({earlier[-1], *rng.sample(earlier, min(2, len(earlier)))})
                if rng.random() < 0.3:  # role -> stage mapping form
                    lines += ["    needs:"] + [f"      r_{p}: {p}" for p in picks]
                else:
                    lines.append(f"    needs: [{', '.join(picks)}]")
            lines += [
                "    params:",
                "      function: bench_steps:step",
                f"      args: {{spec: {i}, k: {k}, scale: {rng.randint(1, 100)}, tag: t{rng.random():.6f}}}",
                "      metrics: [value, count]",
                "    gates:",
                f"      - value >= {k % 3} (abort < -1)",
                "      - count > 0",
            ]
            if k % 2:
                lines.append("      - ci_low(value) > -10")
        lines += [
            "profiles:",
            "  tiny:",
            "    seed: 1",
            "    stages:",
            "      s0:",
            "        params:",
            "          args: {scale: 1}",
            "  fast:",
            "    stages:",
            f"      s{n - 1}:",
            "        gates: [count > 0]",
        ]
        (exp_dir / f"bench_{i:03d}.yaml").write_text("\n".join(lines) + "\n")
        total += n + shared
    return total


def bench_collection(tmp: Path, count: int, repeats: int) -> list[Row]:
    specs_root = write_project(tmp / "collect")
    stages = generate_specs(specs_root / "experiments", count)
    files = sorted((specs_root / "experiments").glob("*.yaml"))

    # (a) in-process: load_experiment over every spec (a first pass warms imports and schemas)
    cold = time.perf_counter()
    per_file = [len(load_experiment(f).stages) for f in files]
    cold = time.perf_counter() - cold
    if sum(per_file) != stages:
        sys.exit(f"load_experiment found {sum(per_file)} stages in {count} specs, expected {stages}")
    totals = []
    for _ in range(repeats):
        start = time.perf_counter()
        for f in files:
            load_experiment(f)
        totals.append(time.perf_counter() - start)

    # (b) subprocess collection, against the same command on trivial test files and on nothing
    base_root = write_project(tmp / "collect_baseline")
    for i, n in enumerate(per_file):  # as many items per file as the specs have stages
        trivial_tests(base_root / f"test_{i:03d}.py", n)
    empty_root = write_project(tmp / "empty")
    commands = {
        "specs": (specs_root, "experiments", stages),
        "tests": (base_root, ".", stages),
        "empty": (empty_root, ".", 0),
    }

    def collect(name: str) -> Callable[[], float]:
        root, target, expected = commands[name]

        def run() -> float:
            wall, out = pytest_cmd(root, "--collect-only", "-q", target, ok=(0, 5) if not expected else (0,))
            if collected(out) != expected:
                sys.exit(f"collected {collected(out)} items in {root}, expected {expected}:\n{out}")
            return wall

        return run

    for name in commands:  # warm-up: bytecode caches, filesystem
        collect(name)()
    times = alternate(repeats, {name: collect(name) for name in commands})
    overhead = [s - t for s, t in zip(times["specs"], times["tests"], strict=True)]
    return [
        Row(f"load_experiment, {count} specs, first pass", [cold], note=f"{stages} stages, caches cold"),
        Row(f"load_experiment, {count} specs", totals, note="in-process, warm"),
        Row("load_experiment, per spec", totals, scale=1 / count, unit="ms"),
        Row("pytest --collect-only, empty dir", times["empty"], note="interpreter + pytest + plugins"),
        Row(f"pytest --collect-only, {count} test files", times["tests"], note=f"{stages} trivial tests"),
        Row(f"pytest --collect-only, {count} specs", times["specs"], note=f"{stages} stage items"),
        Row("  specs - test files", overhead, note="spec loading + validation in pytest"),
        Row("  specs - test files, per spec", overhead, scale=1 / count, unit="ms"),
    ]


# --- 2. no-op rerun of a 10-stage chain ------------------------------------------------------

CHAIN_STAGES = 10


def write_chain(root: Path) -> Path:
    exp = root / "experiments"
    exp.mkdir()
    (exp / "bench_steps.py").write_text(STEP_MODULE)
    lines = ["experiment: chain10", "seed: 3", "stages:"]
    for k in range(CHAIN_STAGES):
        lines += [f"  s{k}:", "    kind: python"]
        if k:
            lines.append(f"    needs: [s{k - 1}]")
        lines += [
            "    params:",
            "      function: bench_steps:step",
            f"      args: {{k: {k}}}",
            "      metrics: [value, count]",
            "    gates:",
            "      - count >= 1 (abort < 0)",
        ]
    spec = exp / "chain10.yaml"
    spec.write_text("\n".join(lines) + "\n")
    trivial_tests(root / "test_trivial.py", CHAIN_STAGES)
    return spec


def check_statuses(report: Path, expected: str) -> None:
    if not report.is_file():
        sys.exit(f"no run report written at {report}")
    stages = json.loads(report.read_text())["stages"]
    statuses = {s["stage"]: s["status"] for s in stages}
    if len(statuses) != CHAIN_STAGES or set(statuses.values()) != {expected}:
        sys.exit(f"expected all {CHAIN_STAGES} stages {expected!r}, report says {statuses}")


class ItemTimer:
    """A pytest plugin timing collection and each item's whole protocol, in-process."""

    def __init__(self) -> None:
        self.items: list[float] = []
        self.collection = 0.0

    @pytest.hookimpl(wrapper=True)
    def pytest_collection(self, session):
        start = time.perf_counter()
        try:
            return (yield)
        finally:
            self.collection = time.perf_counter() - start

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        start = time.perf_counter()
        try:
            return (yield)
        finally:
            self.items.append(time.perf_counter() - start)


def in_process(root: Path, *args: str) -> ItemTimer:
    timer = ItemTimer()
    cwd = Path.cwd()
    os.chdir(root)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            code = pytest.main(["-q", "-p", "no:cacheprovider", *args], plugins=[timer])
    finally:
        os.chdir(cwd)
    if code != 0:
        sys.exit(f"in-process pytest {' '.join(args)} exited {code}:\n{out.getvalue()}")
    return timer


def bench_rerun(tmp: Path, repeats: int) -> tuple[list[Row], bool]:
    root = write_project(tmp / "rerun")
    spec = write_chain(root)
    runs = root / "runs"
    report = runs / "chain10" / "default" / "report.json"
    args = ("-q", "--runs-dir", str(runs), str(spec))

    cold, _ = pytest_cmd(root, *args)
    check_statuses(report, Status.RAN)

    def rerun() -> float:
        report.unlink()
        wall, _ = pytest_cmd(root, *args)
        check_statuses(report, Status.REUSED)
        return wall

    def baseline() -> float:
        return pytest_cmd(root, "-q", "test_trivial.py")[0]

    baseline()  # warm-up (assertion-rewrite cache)
    times = alternate(repeats, {"rerun": rerun, "baseline": baseline})
    overhead = [r - b for r, b in zip(times["rerun"], times["baseline"], strict=True)]
    met = statistics.median(overhead) < TARGET_RERUN_OVERHEAD_S

    # in-process: pytest.main with a timing plugin, and ExperimentRun.resolve without pytest
    stage_items, test_items, collect_spec, collect_tests = [], [], [], []
    for _ in range(repeats):
        report.unlink()
        harness = in_process(root, "--runs-dir", str(runs), str(spec))
        check_statuses(report, Status.REUSED)
        plain = in_process(root, "test_trivial.py")
        stage_items += harness.items
        test_items += plain.items
        collect_spec.append(harness.collection)
        collect_tests.append(plain.collection)
    resolves = []
    for _ in range(repeats):
        experiment = load_experiment(spec)
        run = ExperimentRun(experiment, runs)
        start = time.perf_counter()
        results = [run.resolve(name) for name in experiment.stages]
        resolves.append(time.perf_counter() - start)
        if any(r.status != Status.REUSED for r in results):
            sys.exit(f"direct resolve did not reuse every stage: {[(r.stage, r.status) for r in results]}")

    n = CHAIN_STAGES
    rows = [
        Row(f"cold run, {n}-stage chain", [cold], note="fills the store (imports numpy/torch to seed)"),
        Row(f"baseline: {n} trivial tests", times["baseline"], note="subprocess"),
        Row(f"no-op rerun, {n}-stage chain", times["rerun"], note="subprocess, every stage reused"),
        Row("  overhead = rerun - baseline", overhead, note=f"target < {TARGET_RERUN_OVERHEAD_S:g} s"),
        Row("in-process: collect the spec", collect_spec, unit="ms", note="pytest.main, timing plugin"),
        Row(f"in-process: collect {n} tests", collect_tests, unit="ms"),
        Row("in-process: per reused stage item", stage_items, unit="ms", note="setup+call+teardown+report"),
        Row("in-process: per trivial test item", test_items, unit="ms"),
        Row(f"ExperimentRun.resolve, {n} stages", resolves, unit="ms", note="no pytest: key + store lookup"),
        Row("ExperimentRun.resolve, per stage", resolves, scale=1 / n, unit="ms"),
    ]
    return rows, met


# --- main ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (default 5)")
    parser.add_argument("--specs", type=int, default=200, help="specs generated for collection (default 200)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory and print it")
    opts = parser.parse_args()

    print(
        f"harness benchmarks: Python {platform.python_version()}, pytest {pytest.__version__}, "
        f"{os.cpu_count()} CPUs ({platform.machine()}, {platform.system()}), "
        f"{opts.repeats} repeats, medians"
    )
    tmp = Path(tempfile.mkdtemp(prefix="harness-bench-"))
    try:
        started = time.perf_counter()
        print_table("1. collection + validation", bench_collection(tmp, opts.specs, opts.repeats))
        rows, met = bench_rerun(tmp, opts.repeats)
        print_table(f"2. no-op rerun of a {CHAIN_STAGES}-stage spec", rows)
        verdict = "MET" if met else "NOT MET"
        print(f"\nrerun overhead target (< {TARGET_RERUN_OVERHEAD_S:g} s): {verdict}")
        print(f"total benchmark time: {time.perf_counter() - started:.1f} s")
    finally:
        if opts.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
