"""Benchmark of `--executor ray` against `--executor local`.

    python benchmarks/bench_ray_executor.py [--stages 16] [--seconds 2] [--slots 4] [--chain 8] [--keep]

1. Wide: an experiment of `--stages` independent `python` stages that each wait
   `--seconds` (standing in for GPU work), run cold by pytest with the local executor and
   with the Ray executor on a local Ray cluster of `--slots` CPU slots (its head, started
   here); wall times of the whole pytest command and the speed-up.
2. Overhead: a chain of `--chain` no-op stages (each needs the one before, so nothing
   runs at the same time), cold, both ways: (ray - local) / stages is what the Ray path
   adds to a stage (task submission, a worker process per pytest run, results through
   the object store). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ray.cluster_utils import Cluster

STEPS = """
import time


def wait(ctx):
    time.sleep(ctx.params["args"]["seconds"])
    return {"waited": ctx.params["args"]["seconds"]}
"""


def spec(name: str, stages: int, seconds: float, chain: bool) -> str:
    lines = [f"experiment: {name}", "stages:"]
    for i in range(stages):
        needs = f", needs: [s{i - 1}]" if chain and i else ""
        lines.append(
            f"  s{i}: {{kind: python{needs}, params: {{function: 'steps.waits:wait', "
            f"args: {{seconds: {seconds}, i: {i}}}, metrics: [waited]}}}}"
        )
    return "\n".join(lines) + "\n"


def pytest_wall(work: Path, spec_file: Path, runs: Path, *extra: str) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(spec_file),
            "-q",
            "-p",
            "no:cacheprovider",
            "--runs-dir",
            str(runs),
        ]
        + list(extra),
        cwd=work,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"pytest failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--chain", type=int, default=8)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    (work / "steps").mkdir()
    (work / "steps" / "__init__.py").write_text("")
    (work / "steps" / "waits.py").write_text(STEPS)
    wide, chain = work / "wide.yaml", work / "chain.yaml"
    wide.write_text(spec("wide", args.stages, args.seconds, chain=False))
    chain.write_text(spec("chain", args.chain, 0, chain=True))

    print(f"python {platform.python_version()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.slots})
    try:
        ray = ("--executor", "ray", "--ray-address", cluster.address)
        local_wide = pytest_wall(work, wide, work / "runs-local")
        ray_wide = pytest_wall(work, wide, work / "runs-ray", *ray)
        local_chain = pytest_wall(work, chain, work / "runs-local")
        ray_chain = pytest_wall(work, chain, work / "runs-ray", *ray)
        ray_rerun = pytest_wall(work, wide, work / "runs-ray", *ray)
    finally:
        cluster.shutdown()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    ideal = args.stages * args.seconds
    print(f"\n{args.stages} independent stages of {args.seconds:g} s, Ray with {args.slots} slots (cold):")
    print(f"  local  {local_wide:6.2f} s  (the waits alone: {ideal:.0f} s)")
    print(f"  ray    {ray_wide:6.2f} s  (bound: {ideal / args.slots:.0f} s)")
    print(f"  speed-up {local_wide / ray_wide:.2f}x")
    print(f"  ray rerun (all reused, nothing submitted) {ray_rerun:.2f} s")
    print(f"\nchain of {args.chain} no-op stages (cold):")
    print(f"  local {local_chain:.2f} s, ray {ray_chain:.2f} s")
    print(f"  Ray overhead per stage {(ray_chain - local_chain) / args.chain:.3f} s")
    if args.keep:
        print(f"\nkept {work}")


if __name__ == "__main__":
    main()
