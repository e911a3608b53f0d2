"""The `harness` command: `harness compare` (two runs side by side) and `harness index` (the
results table across experiments and profiles). Runs are made by pytest; these only read them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness.core.stage import StageError
from harness.report.compare import choose_sides, compare, to_markdown
from harness.report.index import write_index
from harness.spec.errors import SpecError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    cmp = commands.add_parser(
        "compare",
        help="two runs side by side: params that differ, metrics with deltas and CIs, gates that changed",
        description="Compare two specs or run directories (the latest run of each stage); one spec under "
        "--profiles A B; one spec or run directory at --commits C1 C2; or two keys of one stage (--stage, "
        "or its directory; --keys K1 K2, else its two latest runs). Markdown on stdout, or --json.",
    )
    cmp.add_argument(
        "targets", nargs="+", type=Path, metavar="SPEC|RUN_DIR", help="a spec or a run directory"
    )
    cmp.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where a spec's runs are (runs/)")
    cmp.add_argument("--profile", help="the profile of a spec given alone (default: none)")
    cmp.add_argument("--profiles", nargs=2, metavar=("A", "B"), help="compare a spec's two profiles")
    cmp.add_argument(
        "--commits", nargs=2, metavar=("C1", "C2"), help="the runs each stage made at two commits"
    )
    cmp.add_argument("--stage", help="one stage: with --keys, or alone for its two latest runs")
    cmp.add_argument("--keys", nargs=2, metavar=("K1", "K2"), help="two keys (or unique prefixes) of --stage")
    cmp.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    index = commands.add_parser(
        "index",
        help="write RUNS/index.md, .html and .json: every experiment's latest gates and headline metrics",
    )
    index.add_argument("--runs-dir", type=Path, default=Path("runs"), help="the runs directory (runs/)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "compare":
            sides = choose_sides(
                args.targets, args.runs_dir, args.profile, args.profiles, args.stage, args.keys, args.commits
            )
            comparison = compare(*sides)
            print(json.dumps(comparison, indent=2, default=str) if args.json else to_markdown(comparison))
        else:
            paths = write_index(args.runs_dir)
            print("\n".join(str(p) for p in paths.values()))
    except (StageError, SpecError) as exc:
        print(f"harness {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
