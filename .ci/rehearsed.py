"""Exit 1 unless every experiment's rehearsal ran every stage of its spec: each report in
`<runs>/*/default.rehearsal/report.json` has every stage run in this session (none reused,
skipped or failed) and says what it replaced. Prints each experiment's stages, time and gates
(which a rehearsal reports, never requires). CI runs it after `pytest experiments --rehearse`.

    python .ci/rehearsed.py "$rehearsal_runs" experiments/*.yaml
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml


def check(runs: Path, experiment: str) -> list[str]:
    path = runs / experiment / "default.rehearsal" / "report.json"
    if not path.is_file():
        return [f"{experiment}: no rehearsal report at {path}"]
    report = json.loads(path.read_text())
    stages = report["stages"]
    problems = [
        f"{experiment}::{s['stage']}: {s['status']} ({s['reason']})" for s in stages if s["status"] != "ran"
    ]
    if report["run"]["partial"]:
        problems.append(
            f"{experiment}: the rehearsal ran {len(stages)} of {report['run']['stages_in_spec']} stages"
        )
    gates = [g for s in stages for g in s["gates"]]
    took = sum(s["duration_s"] for s in stages)
    print(
        f"{experiment}: {len(stages)} stages ran in {took:.0f} s; gates reported: "
        f"{sum(g['passed'] for g in gates)} of {len(gates)} hold (random models)"
    )
    if "rehearsal" not in report:
        problems.append(f"{experiment}: the report does not record what the rehearsal replaced")
    return problems


def main(runs: Path, specs: list[str]) -> int:
    experiments = [yaml.safe_load(Path(s).read_text()).get("experiment", Path(s).stem) for s in specs]
    problems = [problem for experiment in experiments for problem in check(runs, experiment)]
    for problem in problems:
        print(f"  NOT REHEARSED: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
