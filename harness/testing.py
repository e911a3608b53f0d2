"""A test kit for kind authors: run one stage kind on given params and upstream directories,
as the engine would, without a spec or a store.

    result = run_kind("word_count", {"text": str(path)}, tmp_path / "out")
    assert result.metrics["n_words"] == 3 and (result.out_dir / "counts.json").is_file()

The params get the schema's defaults, as the engine gives them; input paths are used as
given (write them absolute). The metrics are held to the kind's contract (a mapping of JSON
values with every declared name) and returned as the engine hands them to the gates (numpy
scalars as Python numbers, NaN as None).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.core import registry
from harness.core.execution import checked_metrics
from harness.core.seeding import seed_everything
from harness.core.stage import StageContext, StageKind, Upstream


@dataclass(frozen=True)
class KindRun:
    """What one run of a kind gave: its metrics, where it wrote, what it logged."""

    metrics: Mapping[str, Any]
    out_dir: Path
    logs: list[str] = field(default_factory=list)  # what the stage logged, line by line


def _kind_named(kind: StageKind | str) -> StageKind:
    found = registry.get(kind) if isinstance(kind, str) else kind
    if found is None:
        raise LookupError(f"no stage kind {kind!r}; known kinds: {', '.join(registry.names())}")
    return found


def stage_context(
    kind: StageKind | str,
    params: Mapping[str, Any],
    out_dir: Path,
    *,
    upstream: Mapping[str, Path | Upstream] | None = None,
    seed: int = 0,
    spec_dir: Path | None = None,
    stage: str = "stage",
    logs: list[str] | None = None,
) -> StageContext:
    """The context the engine would give a stage of `kind`. `out_dir` is made; the scratch
    directory is its sibling `<out_dir>.scratch`. `upstream` maps each role to the stage
    directory filling it (an Upstream where the kind reads its metrics or kind); the stage's
    log lines are appended to `logs`."""
    kind = _kind_named(kind)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = out_dir.with_name(f"{out_dir.name}.scratch")
    scratch.mkdir(exist_ok=True)
    return StageContext(
        experiment="test",
        stage=stage,
        params=kind.filled(params),
        seed=seed,
        out_dir=out_dir,
        scratch_dir=scratch,
        upstream={
            role: up if isinstance(up, Upstream) else Upstream(role, "", Path(up), {})
            for role, up in (upstream or {}).items()
        },
        spec_file=(spec_dir or out_dir.parent) / "spec.yaml",
        profile=None,
        log=(logs if logs is not None else []).append,
    )


def run_kind(kind: StageKind | str, params: Mapping[str, Any], out_dir: Path, **options: Any) -> KindRun:
    """Run a stage of `kind` (a kind or its name) writing to `out_dir`; `options` are those of
    `stage_context` (upstream, seed, spec_dir, stage)."""
    kind = _kind_named(kind)
    logs: list[str] = []
    ctx = stage_context(kind, params, out_dir, logs=logs, **options)
    seed_everything(ctx.seed)  # as the engine does
    metrics = checked_metrics(ctx.stage, kind, ctx.params, kind.run(ctx))  # what gates would read
    return KindRun(metrics, ctx.out_dir, logs)
