"""Pre-registration: the lock of a spec's analysis plan, and whether a run is pre-registered.

`pytest SPEC --lock-hypotheses` records, per profile, the hash of the analysis plan in
`<stem>.lock.json` beside the spec. A run is pre-registered only when that lock exists for
its profile, its hash matches, and the samples tested were produced after it; otherwise it
is exploratory, and every report says why.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.provenance import git_commit
from harness.store import read_json, write_json

if TYPE_CHECKING:
    from harness.hypotheses import HypothesisPlan

LOCK_SUFFIX = ".lock.json"
PREREGISTERED, EXPLORATORY = "pre-registered", "exploratory"


class HypothesisError(Exception):
    """A problem a user can fix (missing samples, a refused relock): shown as its message alone."""


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


def _utc(text: str) -> datetime | None:
    try:
        stamp = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)


def _made(entry: Mapping[str, Any]) -> str:
    commit = entry.get("git_commit")
    where = (
        f"commit {commit[:12]}{' with local changes' if entry.get('git_dirty') else ''}"
        if commit
        else "no git commit"
    )
    return f"the lock made at {entry.get('locked_at', '?')} ({where})"


def plan_changes(before: Any, after: Any, prefix: str = "") -> list[str]:
    """What differs between two plans, as `tests.H1.alpha: 0.05 -> 0.1`."""
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


def write_lock(plan: HypothesisPlan, spec_file: Path, profile: str, relock: bool = False) -> tuple[Path, str]:
    """Record the plan's hash for `profile` in the lock file beside the spec; returns the file
    and what was done. A different plan already locked is refused unless `relock`."""
    path = lock_path(spec_file)
    data = _read_lock(path) or {}
    profiles = dict(data.get("profiles", {}))
    old = profiles.get(profile)
    if isinstance(old, dict) and old.get("hash") == plan.digest:
        return path, f"unchanged: already locked at {old.get('locked_at')}"
    if isinstance(old, dict) and not relock:
        changes = plan_changes(old.get("plan", {}), plan.as_json()) or ["(hash differs)"]
        raise HypothesisError(
            f"the hypotheses of {spec_file.name} [{profile}] differ from {_made(old)} in {path.name}:\n"
            + "".join(f"  {c}\n" for c in changes)
            + "A plan changed after locking is exploratory. To lock the new plan anyway, run again with "
            "--relock (the lock keeps a record of the earlier one)."
        )
    commit = git_commit(spec_file.parent)
    entry = {
        "hash": plan.digest,
        "locked_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit["commit"] if commit else None,
        "git_dirty": commit["dirty"] if commit else None,
        "hypotheses": list(plan.tests),
        "plan": plan.as_json(),
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
            "about": "Hashes of the pre-registered hypotheses and analysis plan of each profile, "
            "written by `pytest SPEC --lock-hypotheses [--profile NAME]`.",
            "profiles": profiles,
        },
    )
    return path, ("relocked, replacing " + _made(old)) if old else "locked"


@dataclass
class Registration:
    """Whether this run's plan is the one locked before its data were produced."""

    status: str  # pre-registered | exploratory
    reason: str
    lock: dict[str, Any] | None = None  # the profile's lock entry, if any
    changes: list[str] = field(default_factory=list)

    @property
    def preregistered(self) -> bool:
        return self.status == PREREGISTERED

    def as_json(self) -> dict[str, Any]:
        lock = self.lock or {}
        return {
            "status": self.status,
            "reason": self.reason,
            "changes": self.changes,
            "locked_at": lock.get("locked_at"),
            "git_commit": lock.get("git_commit"),
            "lock_hash": lock.get("hash"),
        }


def registration(plan: HypothesisPlan, spec_file: Path, profile: str) -> Registration:
    path = lock_path(spec_file)
    option = "" if profile == "default" else f" --profile {profile}"
    lock_cmd = f"`pytest {spec_file.name} --lock-hypotheses{option}`"
    try:
        data = _read_lock(path)
    except HypothesisError as exc:
        return Registration(EXPLORATORY, f"{exc}; no lock can be read")
    if data is None:
        return Registration(
            EXPLORATORY, f"no lock file ({path.name}); lock the plan with {lock_cmd} before running"
        )
    entry = data["profiles"].get(profile)
    if not isinstance(entry, dict):
        return Registration(
            EXPLORATORY, f"{path.name} holds no lock for profile {profile!r}; lock it with {lock_cmd}"
        )
    if entry.get("hash") != plan.digest:
        changes = plan_changes(entry.get("plan", {}), plan.as_json())
        what = "; ".join(changes) if changes else "the hash differs"
        return Registration(
            EXPLORATORY, f"the hypotheses differ from {_made(entry)}: {what}", lock=entry, changes=changes
        )
    reason = f"the plan matches {_made(entry)} in {path.name}"
    if entry.get("previous"):
        first = entry["previous"][0]
        reason += f"; relocked {len(entry['previous'])} time(s), first locked at {first.get('locked_at')}"
    return Registration(PREREGISTERED, reason, lock=entry)


def check_produced_after_lock(registration: Registration, produced: Mapping[str, str]) -> Registration:
    """Samples produced before the lock may have been looked at: not pre-registered.
    `produced` maps stage -> finished_at of the run whose samples are tested."""
    if not registration.preregistered:
        return registration
    locked = _utc(registration.lock.get("locked_at", ""))
    early = {s: t for s, t in produced.items() if locked and (_utc(t) or locked) < locked}
    if not early:
        return registration
    stages = ", ".join(f"{s!r} at {t}" for s, t in early.items())
    return Registration(
        EXPLORATORY,
        f"the samples tested were produced before {_made(registration.lock)}: stage {stages}; "
        f"they may have been seen before locking. Produce them again under the lock with "
        f"`--rerun {' --rerun '.join(early)}`",
        lock=registration.lock,
    )
