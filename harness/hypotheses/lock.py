"""Pre-registration: the lock of a spec's analysis, and whether a run is pre-registered.

`pytest SPEC --lock-hypotheses` records, per profile, in `<stem>.lock.json` beside the spec,
the hash of everything that decides the data and the analysis behind the hypotheses: the
plan (hypotheses with defaults, correction, policies, seed) and the recipe of every stage
the hypotheses read or depend on (kind, code version, resolved params with defaults, seed,
input file contents, which stages it needs). It also records which of those stages'
results the store already held: results under those keys may have been seen before the
lock and stay exploratory whenever they were produced (a seeded `--rerun` reproduces them
exactly). Users commit the lock before running: the commit is the external timestamp that
reports show.

A run is pre-registered only when the lock exists for its profile, its hash matches, and
the store held no results of the tested stages' recipes when it was made; otherwise it is
exploratory, and every report says why.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.core.graph import canonical_json
from harness.core.provenance import git_commit
from harness.core.store import StageStore, read_json, write_json

if TYPE_CHECKING:
    from harness.core.experiment import Experiment
    from harness.core.remote_store import RemoteStore

LOCK_SUFFIX = ".lock.json"
PREREGISTERED, EXPLORATORY = "pre-registered", "exploratory"


class HypothesisError(Exception):
    """A problem a user can fix (missing samples, a refused relock): shown as its message alone."""


@dataclass(frozen=True)
class LockBasis:
    """What a lock covers: the analysis plan and the recipe of every stage behind it."""

    plan: Mapping[str, Any]  # HypothesisPlan.as_json()
    stages: Mapping[str, Mapping[str, Any]]  # stage -> recipe (harness.core.execution.stage_recipe)
    tested: tuple[str, ...]  # the stages whose samples the hypotheses read

    def as_json(self) -> dict[str, Any]:
        return {"plan": dict(self.plan), "stages": {n: dict(r) for n, r in self.stages.items()}}

    @property
    def digest(self) -> str:
        return hashlib.sha256(canonical_json(self.as_json()).encode()).hexdigest()


def lock_basis(experiment: Experiment) -> LockBasis:
    """The plan and the recipe of every stage the hypotheses read, directly or not. The
    recipes need each stage's code (a python stage's module): a missing one is refused."""
    from harness.core.execution import stage_recipe
    from harness.core.stage import ParamError

    plan = experiment.hypotheses
    tested = tuple(dict.fromkeys(stage for h in plan.tests.values() for stage in h.stages))
    needed = upstream_closure(tested, {name: spec.needs for name, spec in experiment.stages.items()})
    recipes = {}
    for name in needed:
        try:
            recipes[name] = stage_recipe(experiment.stages[name], experiment)
        except ParamError as exc:
            raise HypothesisError(
                f"stage {name!r}: {exc.message}; the lock covers the code of every stage behind "
                "the hypotheses, so it is made where that code is"
            ) from None
    return LockBasis(plan.as_json(), recipes, tested)


def stored_keys(
    basis: LockBasis, runs_dir: Path, experiment: Experiment, remote: RemoteStore | None = None
) -> dict[str, list[str]]:
    """Per stage of the basis, the keys of the results the store holds under its whole lineage
    of recipes: its own, and those of the results it was made from, recursively. Keys are not
    compared: the same recipes rerun elsewhere give other bytes (paths, floats), not other data.
    With a remote store, its results count too, wherever they were made."""
    from harness.core.execution import recipe_of

    recipes = json.loads(canonical_json(basis.stages))
    manifests: dict[str, dict[str, dict[str, Any]]] = {}
    verdicts: dict[tuple[str, str], bool] = {}

    def stored(stage: str) -> dict[str, dict[str, Any]]:
        if stage not in manifests:
            store = StageStore(runs_dir, experiment.name, experiment.profile_dir, stage, remote)
            manifests[stage] = store.manifests()
        return manifests[stage]

    def made_under_basis(stage: str, key: str) -> bool:
        if (stage, key) not in verdicts:
            verdicts[stage, key] = False  # a cycle of keys cannot be a lineage
            found = stored(stage).get(key)
            material = found.get("key_material", {}) if found else {}
            verdicts[stage, key] = (
                bool(found)
                and recipe_of(material) == recipes[stage]
                and all(
                    made_under_basis(up["stage"], up["key"]) for up in material.get("upstream", {}).values()
                )
            )
        return verdicts[stage, key]

    return {
        name: [key for key in sorted(stored(name)) if made_under_basis(name, key)] for name in basis.stages
    }


def upstream_closure(stages: Iterable[str], needs: Mapping[str, Mapping[str, str]]) -> list[str]:
    """`stages` and every stage they need, directly or not, in the order of `needs`."""
    wanted, todo = set(), list(stages)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo.extend(needs[name].values())
    return [name for name in needs if name in wanted]


def lock_path(spec_file: Path) -> Path:
    return spec_file.with_name(spec_file.stem + LOCK_SUFFIX)


def _read_lock(path: Path) -> dict[str, Any] | None:
    """The lock file's content, None if there is none; HypothesisError if it is damaged."""
    if not path.exists():
        return None
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("profiles"), dict):
        raise HypothesisError(f"{path} is not a lock file written by --lock-hypotheses")
    return data


def _made(entry: Mapping[str, Any]) -> str:
    commit = entry.get("git_commit")
    where = (
        f"commit {commit[:12]}{' with local changes' if entry.get('git_dirty') else ''}"
        if commit
        else "no git commit"
    )
    return f"the lock made at {entry.get('locked_at', '?')} ({where})"


def plan_changes(before: Any, after: Any, prefix: str = "") -> list[str]:
    """What differs between two lock bases, as `plan.tests.H1.alpha: 0.05 -> 0.1` or
    `stages.em_matrix.params.judge.model: "gpt-4o-mini" -> "gpt-4o"`."""
    if isinstance(before, dict) and isinstance(after, dict):
        out = []
        for key in [*before, *(k for k in after if k not in before)]:
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in after:
                out.append(f"{path} removed")
            elif key not in before:
                out.append(f"{path} added")
            else:
                out += plan_changes(before[key], after[key], path)
        return out
    return [] if before == after else [f"{prefix}: {json.dumps(before)} -> {json.dumps(after)}"]


def write_lock(
    basis: LockBasis,
    spec_file: Path,
    profile: str,
    existing: Mapping[str, list[str]],
    relock: bool = False,
) -> tuple[Path, str]:
    """Record the basis's hash for `profile` in the lock file beside the spec, with the keys
    of its stages that the store already holds (`existing`); returns the file and what was
    done. A different basis already locked is refused unless `relock`."""
    path = lock_path(spec_file)
    data = _read_lock(path) or {}
    profiles = dict(data.get("profiles", {}))
    old = profiles.get(profile)
    if isinstance(old, dict) and old.get("hash") == basis.digest:
        return path, f"unchanged: already locked at {old.get('locked_at')}"
    if isinstance(old, dict) and not relock:
        changes = basis_changes(old, basis) or ["(hash differs)"]
        raise HypothesisError(
            f"the analysis of {spec_file.name} [{profile}] differs from {_made(old)} in {path.name}:\n"
            + "".join(f"  {c}\n" for c in changes)
            + "An analysis changed after locking is exploratory. To lock the new one anyway, run again "
            "with --relock (the lock keeps a record of the earlier one)."
        )
    commit = git_commit(spec_file.parent)
    entry = {
        "hash": basis.digest,
        "locked_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit["commit"] if commit else None,
        "git_dirty": commit["dirty"] if commit else None,
        "hypotheses": list(basis.plan.get("tests", {})),
        **basis.as_json(),
        "existing_keys": {stage: sorted(keys) for stage, keys in existing.items() if keys},
    }
    if isinstance(old, dict):
        previous = old.get("previous", [])
        entry["previous"] = [
            *previous,
            {k: old.get(k) for k in ("hash", "locked_at", "git_commit", "git_dirty")},
        ]
    profiles[profile] = entry
    write_json(
        path,
        {
            "spec": spec_file.name,
            "about": "Per profile, the hash of the pre-registered analysis (the hypotheses' plan and "
            "the recipe of every stage behind them) and the stage results that existed when it was "
            "locked; written by `pytest SPEC --lock-hypotheses [--profile NAME]`. Commit this file "
            "before running: its commit is the lock's external timestamp.",
            "profiles": profiles,
        },
    )
    return path, ("relocked, replacing " + _made(old)) if old else "locked"


def basis_changes(entry: Mapping[str, Any], basis: LockBasis) -> list[str]:
    """What differs between a lock entry and the analysis now."""
    now = basis.as_json()
    changes = plan_changes(entry.get("plan", {}), now["plan"], "plan")
    if "stages" not in entry:  # a lock of the plan alone, written before locks held recipes
        return changes + ["stages: the lock holds no recipes of the stages behind the hypotheses"]
    return changes + plan_changes(entry["stages"], now["stages"], "stages")


def lock_commit(path: Path) -> dict[str, Any]:
    """The commit that last changed the lock file, and whether the file differs from it."""

    def git(*args: str, check: bool = True) -> str:
        return subprocess.run(
            ["git", *args], cwd=path.parent, capture_output=True, text=True, timeout=10, check=check
        ).stdout.strip()

    try:
        changed = bool(git("status", "--porcelain", "--", path.name))
        last = git("log", "-1", "--format=%H %cI", "--", path.name, check=False)  # fails before a commit
    except (OSError, subprocess.SubprocessError):  # no git, or not a repository
        return {"commit": None, "committed_at": None, "uncommitted": None}
    commit, _, when = last.partition(" ")
    return {"commit": commit or None, "committed_at": when or None, "uncommitted": changed or not commit}


@dataclass
class Registration:
    """Whether this run's analysis is the one locked before its data were produced."""

    status: str  # pre-registered | exploratory
    reason: str
    lock: dict[str, Any] | None = None  # the profile's lock entry, if any
    changes: list[str] = field(default_factory=list)
    lock_file: dict[str, Any] = field(default_factory=dict)  # lock_commit() of the lock file

    def as_json(self) -> dict[str, Any]:
        lock = self.lock or {}
        return {
            "status": self.status,
            "reason": self.reason,
            "changes": self.changes,
            "locked_at": lock.get("locked_at"),
            "git_commit": lock.get("git_commit"),
            "lock_hash": lock.get("hash"),
            "lock_commit": self.lock_file.get("commit"),
            "lock_committed_at": self.lock_file.get("committed_at"),
            "lock_uncommitted": self.lock_file.get("uncommitted"),
        }


def registration(basis: LockBasis, spec_file: Path, profile: str) -> Registration:
    path = lock_path(spec_file)
    option = "" if profile == "default" else f" --profile {profile}"
    lock_cmd = f"`pytest {spec_file.name} --lock-hypotheses{option}`, commit the lock file, then run"
    try:
        data = _read_lock(path)
    except HypothesisError as exc:
        return Registration(EXPLORATORY, f"{exc}; no lock can be read")
    if data is None:
        return Registration(EXPLORATORY, f"no lock file ({path.name}); lock the analysis with {lock_cmd}")
    entry = data["profiles"].get(profile)
    if not isinstance(entry, dict):
        return Registration(
            EXPLORATORY, f"{path.name} holds no lock for profile {profile!r}; lock it with {lock_cmd}"
        )
    committed = lock_commit(path)
    if entry.get("hash") != basis.digest:
        changes = basis_changes(entry, basis)
        what = "; ".join(changes) if changes else "the hash differs"
        return Registration(
            EXPLORATORY,
            f"the analysis differs from {_made(entry)}: {what}",
            lock=entry,
            changes=changes,
            lock_file=committed,
        )
    existing = [stage for stage in basis.tested if entry.get("existing_keys", {}).get(stage)]
    if existing:
        return Registration(
            EXPLORATORY,
            f"the results of stage {', '.join(map(repr, existing))} already existed in the store when "
            f"{_made(entry)}, under the same recipes: they may have been seen before locking, and "
            "rerunning them reproduces the same data. Results pre-registered under a lock come from "
            "recipes the store held no results of when it was made (e.g. a new seed, locked first)",
            lock=entry,
            lock_file=committed,
        )
    reason = f"the analysis matches {_made(entry)} in {path.name}"
    if committed["commit"]:
        reason += f", committed in {committed['commit'][:12]} at {committed['committed_at']}"
    if committed["uncommitted"]:
        reason += (
            f"; {path.name} is not committed as locked: commit it before running, its commit is "
            "the lock's only external timestamp"
        )
    if entry.get("previous"):
        first = entry["previous"][0]
        reason += f"; relocked {len(entry['previous'])} time(s), first locked at {first.get('locked_at')}"
    return Registration(PREREGISTERED, reason, lock=entry, lock_file=committed)
