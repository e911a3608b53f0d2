"""Exit 1 unless two runs of one experiment and profile agree: the same key for every stage
(so the same outputs: a key holds its upstreams' output digests) and the same hypothesis
results. CI runs it on the local and the Ray runs of one study.

    python .ci/same_results.py runs/persona_em/tiny other-runs/persona_em/tiny
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FIELDS = ("verdict", "effect", "p_value", "ci_low", "ci_high")


def stage_keys(run: Path) -> dict[str, str]:
    return {latest.parent.name: latest.read_text().strip() for latest in run.glob("*/LATEST")}


def hypotheses(run: Path) -> dict[str, tuple]:
    found = json.loads((run / "hypotheses.json").read_text())["hypotheses"]
    return {h["id"]: tuple(h.get(field) for field in FIELDS) for h in found}


def compare(what: str, a: dict, b: dict) -> bool:
    differ = sorted(name for name in set(a) | set(b) if a.get(name) != b.get(name))
    print(f"{what}: {len(a)} and {len(b)}, {len(differ)} differ")
    for name in differ:
        print(f"  {name}: {a.get(name)} | {b.get(name)}")
    return bool(a) and not differ


def main(first: str, second: str) -> int:
    a, b = Path(first), Path(second)
    same_keys = compare("stage keys", stage_keys(a), stage_keys(b))
    same_hypotheses = compare("hypotheses (verdict, effect, p, CI)", hypotheses(a), hypotheses(b))
    for name, result in sorted(hypotheses(a).items()):
        print(f"  {name}: {result[0]}, effect {result[1]:.4g}, p {result[2]:.4g}")
    return 0 if same_keys and same_hypotheses else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
