"""Two runs side by side: the params that differ, the metrics with their deltas and CIs, and
the gates whose outcome changed.

A side is one complete run (store record) per stage: the latest of each stage of a run
directory (`<runs>/<experiment>/<profile>`), a chosen key of one stage from the store's
history, or the latest record each stage made at a git commit. Its gates are the spec's when
a spec is given, else those report.json names; both sides' gates are evaluated on their own
metrics with harness.core.gates, so a record made before a gate existed is judged too.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.core.execution import changed_paths, why_run
from harness.core.experiment import Experiment, load_plan
from harness.core.gates import Gate, GateSyntaxError, evaluate, metric_value, parse_gate
from harness.core.stage import StageError
from harness.core.store import LATEST, Record, StageStore, read_json
from harness.report.text import gate_result, metric, num
from harness.spec.errors import UnknownProfile

Gates = dict[str, tuple[Gate, ...]]  # by stage


@dataclass(frozen=True)
class RunDir:
    """One experiment's runs under one profile, and the gates its stages are judged by."""

    dir: Path
    gates: Gates

    def stage_stores(self) -> list[StageStore]:
        """The stages with a run in the store: in run order as far as the gates' source knows it."""
        if not self.dir.is_dir():
            raise StageError(f"{self.dir}: no such run directory")
        order = {name: i for i, name in enumerate(self.gates)}
        stages = sorted(
            (d for d in self.dir.iterdir() if (d / LATEST).is_file()),
            key=lambda d: (order.get(d.name, len(order)), d.name),
        )
        return [StageStore.at(d) for d in stages]

    def store(self, stage: str) -> StageStore:
        stores = {s.dir.name: s for s in self.stage_stores()}
        if stage not in stores:
            raise StageError(f"{self.dir} has no stage {stage!r} (stages: {', '.join(stores) or 'none'})")
        return stores[stage]


@dataclass(frozen=True)
class Side:
    label: str
    records: dict[str, Record]  # by stage
    gates: Gates


def run_dir(target: Path, profile: str | None = None, runs_dir: Path = Path("runs")) -> RunDir:
    """The run directory a spec (under `profile`, in `runs_dir`) or a directory names; a stage's
    directory names its run's."""
    if target.suffix in (".yaml", ".yml"):
        experiment = _experiment(target, profile)
        return RunDir(
            runs_dir / experiment.name / experiment.profile_dir,
            {name: stage.gates for name, stage in experiment.stages.items()},
        )
    directory = target.parent if (target / LATEST).is_file() else target
    return RunDir(directory, reported_gates(directory))


def _experiment(spec: Path, profile: str | None) -> Experiment:
    try:
        return load_plan(spec, profile)
    except UnknownProfile:
        if profile != "default":
            raise
        return load_plan(spec, None)  # the spec without a profile, whose runs are under default/


def reported_gates(directory: Path) -> Gates:
    """The gates the run directory's report.json was judged by (none without one)."""
    report = read_json(directory / "report.json") or {}
    gates: Gates = {}
    for stage in report.get("stages", []):
        parsed = []
        for gate in stage.get("gates", []):
            try:
                parsed.append(parse_gate(gate["gate"]))
            except GateSyntaxError:  # written by another version of the harness: not judged
                continue
        gates[stage["stage"]] = tuple(parsed)
    return gates


def latest_side(run: RunDir, label: str) -> Side:
    """The latest complete run of each stage."""
    records = {}
    for store in run.stage_stores():
        manifest = store.latest()
        record = store.lookup(manifest["key"]) if manifest else None
        if record is not None:
            records[store.dir.name] = record
    return Side(label, records, run.gates)


def key_sides(run: RunDir, stage: str, keys: list[str] | None) -> tuple[Side, Side]:
    """Two keys of one stage (unique prefixes will do); without keys, its two latest runs."""
    store = run.store(stage)
    history = sorted(store.records(), key=made_when)
    if keys is None:
        if len(history) < 2:
            raise StageError(f"{store.dir} holds {len(history)} complete run(s): nothing to compare")
        chosen = history[-2:]
    else:
        chosen = [_by_key(history, key, store.dir) for key in keys]
    a, b = (Side(f"{stage} {r.manifest['key']}", {stage: r}, run.gates) for r in chosen)
    return a, b


def made_when(record: Record) -> tuple[str, int]:
    """When a run was made: its manifest's time (whole seconds), then its directory's
    modification time, which orders two runs finished within one second."""
    return record.manifest.get("finished_at", ""), record.dir.stat().st_mtime_ns


def _by_key(history: list[Record], key: str, where: Path) -> Record:
    found = [r for r in history if r.manifest["key"].startswith(key)]
    if len(found) != 1:
        known = ", ".join(r.manifest["key"] for r in history) or "none"
        what = "no" if not found else "more than one"
        raise StageError(f"{where}: {what} complete run with key {key!r} (keys: {known})")
    return found[0]


def commit_side(run: RunDir, commit: str) -> Side:
    """Per stage, the latest record its manifest says was made at `commit` (a hash, a prefix,
    or a name git resolves in the current directory's repository, such as HEAD~1)."""
    full = _resolve_commit(commit)
    records = {}
    for store in run.stage_stores():
        made = [
            r
            for r in store.records()
            if str((r.manifest.get("git") or {}).get("commit", "")).startswith(full)
        ]
        if made:
            records[store.dir.name] = max(made, key=made_when)
    if not records:
        raise StageError(f"{run.dir}: no stage has a run made at commit {commit!r}")
    return Side(f"commit {full[:12]}", records, run.gates)


def _resolve_commit(commit: str) -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # no git, or not a name it knows: a hash prefix
        return commit


def compare(a: Side, b: Side) -> dict[str, Any]:
    """The comparison as JSON: per stage, the keys, what differs, params, metrics and gates."""
    stages = []
    for stage in [*a.records, *(s for s in b.records if s not in a.records)]:
        ra, rb = a.records.get(stage), b.records.get(stage)
        stages.append(
            {
                "stage": stage,
                "a": _record_summary(ra),
                "b": _record_summary(rb),
                "differs": _what_differs(ra, rb),
                "params": _params(ra, rb),
                "metrics": _metrics(ra.metrics if ra else {}, rb.metrics if rb else {}),
                "gates": _gates(a.gates.get(stage, ()), ra, b.gates.get(stage, ()), rb),
            }
        )
    return {"a": a.label, "b": b.label, "stages": stages}


def _record_summary(record: Record | None) -> dict[str, Any] | None:
    if record is None:
        return None
    m = record.manifest
    return {
        "key": m["key"],
        "dir": str(record.dir),
        "finished_at": m.get("finished_at"),
        "duration_s": m.get("duration_s"),
        "git": m.get("git"),
    }


def _what_differs(a: Record | None, b: Record | None) -> str:
    if a is None or b is None:
        return "only in " + ("B" if a is None else "A")
    if a.manifest["key"] == b.manifest["key"]:
        return "same key"
    return why_run(a.manifest, b.manifest["key_material"], b.manifest["key"], b.manifest.get("code"))


def _params(a: Record | None, b: Record | None) -> list[dict[str, Any]]:
    if a is None or b is None:
        return []
    pa, pb = a.manifest["key_material"]["params"], b.manifest["key_material"]["params"]
    return [{"param": p, "a": _at(pa, p), "b": _at(pb, p)} for p in changed_paths(pa, pb)]


def _at(params: Any, path: str) -> Any:
    """The value at a dotted path of changed_paths (None where it is absent)."""
    if path == "(all)":
        return params
    for part in path.split("."):
        params = params.get(part) if isinstance(params, Mapping) else None
    return params


def _metrics(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name in [*a, *(n for n in b if n not in a)]:
        va, vb = _number(a, name), _number(b, name)
        rows.append(
            {
                "metric": name,
                "a": a.get(name),
                "b": b.get(name),
                "delta": vb - va if va is not None and vb is not None else None,
            }
        )
    return rows


def _number(metrics: Mapping[str, Any], name: str) -> float | None:
    try:
        return metric_value(metrics, name, None)
    except (LookupError, TypeError):  # absent, or not a number: no delta
        return None


def _gates(
    gates_a: Iterable[Gate], a: Record | None, gates_b: Iterable[Gate], b: Record | None
) -> list[dict[str, Any]]:
    outcome_a, outcome_b = _outcomes(gates_a, a), _outcomes(gates_b, b)
    rows = []
    for text in [*outcome_a, *(t for t in outcome_b if t not in outcome_a)]:
        oa, ob = outcome_a.get(text), outcome_b.get(text)
        rows.append(
            {
                "gate": text,
                "a": oa,
                "b": ob,
                "changed": (oa and oa["outcome"]) != (ob and ob["outcome"]),
            }
        )
    return rows


def _outcomes(gates: Iterable[Gate], record: Record | None) -> dict[str, dict[str, Any]]:
    if record is None:
        return {}
    out = {}
    for gate in gates:
        result = evaluate(gate, record.metrics)
        verdict = {"passed": result.passed, "aborted": result.aborted, "problem": result.problem}
        out[gate.text] = {"outcome": gate_result(verdict), "value": result.value}
    return out


def choose_sides(
    targets: list[Path],
    runs_dir: Path = Path("runs"),
    profile: str | None = None,
    profiles: list[str] | None = None,
    stage: str | None = None,
    keys: list[str] | None = None,
    commits: list[str] | None = None,
) -> tuple[Side, Side]:
    """What `harness compare` puts side by side: two specs or run directories; one spec under
    two profiles; two commits of one run directory; or two keys of one stage (its two latest
    runs without keys)."""
    if len(targets) == 2:
        if profiles or keys or commits:
            raise StageError("two runs to compare are given: drop --profiles, --keys and --commits")
        a, b = (run_dir(t, profile, runs_dir) for t in targets)
        return latest_side(a, _shown(a.dir)), latest_side(b, _shown(b.dir))
    if len(targets) != 1:
        raise StageError("compare two runs: give two specs or run directories, or one with a choice")
    (target,) = targets
    if profiles:
        if target.suffix not in (".yaml", ".yml"):
            raise StageError("--profiles needs a spec file: the profiles are the spec's")
        a, b = (run_dir(target, p, runs_dir) for p in profiles)
        return latest_side(a, profiles[0]), latest_side(b, profiles[1])
    run = run_dir(target, profile, runs_dir)
    if commits:
        a, b = (commit_side(run, c) for c in commits)
        return (_only(a, stage), _only(b, stage)) if stage else (a, b)
    stage = stage or (target.name if (target / LATEST).is_file() else None)
    if stage is None:
        raise StageError(
            "say what to compare: a second run, --profiles A B, --commits C1 C2, or a stage "
            "(--stage NAME or its directory) and optionally --keys K1 K2"
        )
    return key_sides(run, stage, keys)


def _only(side: Side, stage: str) -> Side:
    if stage not in side.records:
        raise StageError(f"{side.label}: no run of stage {stage!r}")
    return Side(side.label, {stage: side.records[stage]}, side.gates)


def _shown(path: Path) -> str:
    try:
        return path.resolve().relative_to(Path.cwd()).as_posix()
    except ValueError:
        return str(path)


def to_markdown(comparison: Mapping[str, Any]) -> str:
    a, b = comparison["a"], comparison["b"]
    stages = comparison["stages"]
    lines = [f"# harness compare: A = {a}, B = {b}", ""]
    lines += _table(
        ["stage", "A", "B", "what differs"],
        ([s["stage"], _side(s["a"]), _side(s["b"]), s["differs"]] for s in stages),
    )
    params = [(s["stage"], p) for s in stages for p in s["params"]]
    lines += ["## Params that differ", ""]
    lines += _table(
        ["stage", "param", "A", "B"], ([st, p["param"], _json(p["a"]), _json(p["b"])] for st, p in params)
    )
    lines += ["## Metrics", ""]
    lines += _table(
        ["stage", "metric", "A", "B", "B − A"],
        (
            [s["stage"], m["metric"], _metric(m["a"]), _metric(m["b"]), _delta(m["delta"])]
            for s in stages
            for m in s["metrics"]
        ),
    )
    gates = [(s["stage"], g) for s in stages for g in s["gates"]]
    changed = [(st, g) for st, g in gates if g["changed"]]
    lines += [f"## Gates that changed outcome ({len(changed)} of {len(gates)})", ""]
    lines += _table(
        ["stage", "gate", "A", "B"],
        ([st, f"`{g['gate']}`", _gate(g["a"]), _gate(g["b"])] for st, g in changed),
    )
    return "\n".join(lines)


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    body = [_row(row) for row in rows]
    if not body:
        return ["none", ""]
    return [_row(header), _row(["---"] * len(header)), *body, ""]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def _side(summary: Mapping[str, Any] | None) -> str:
    if summary is None:
        return "—"
    commit = (summary.get("git") or {}).get("commit")
    made = ", ".join(x for x in (summary.get("finished_at"), commit and f"commit {commit[:8]}") if x)
    return f"`{summary['key']}`" + (f" ({made})" if made else "")


def _metric(value: Any) -> str:
    return "—" if value is None else metric(value)


def _delta(delta: float | None) -> str:
    return "" if delta is None else ("+" if delta > 0 else "") + num(delta)


def _json(value: Any) -> str:
    return "—" if value is None else f"`{json.dumps(value, sort_keys=True)}`"


def _gate(outcome: Mapping[str, Any] | None) -> str:
    if outcome is None:
        return "—"
    return outcome["outcome"] + (
        f" (measured {num(outcome['value'])})" if outcome["value"] is not None else ""
    )
