"""What a stage finds in the stages it needs: one upstream by role, a saved adapter.

The one layout stages share: a stage that trains an adapter writes it to `adapter/`
in its artifact directory (peft's `save_pretrained`), and any stage that evaluates it
needs that stage in the role `adapter`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from harness.stage import StageError, Upstream

ADAPTER = "adapter"


def find_upstream(upstream: Mapping[str, Upstream], role: str, kind: str, only: bool = True) -> Upstream:
    """The upstream in `role`, or (when `only`: kinds that need one stage) the only
    upstream whatever its role."""
    if role in upstream:
        return upstream[role]
    if only and len(upstream) == 1:
        return next(iter(upstream.values()))
    if not upstream or not only:
        raise StageError(f"{kind} needs the stage that provides its {role}: add `needs: {{{role}: STAGE}}`")
    names = ", ".join(sorted(upstream))
    raise StageError(
        f"{kind} has several upstream stages ({names}); name the one that provides its {role} "
        f"with the role `{role}` (needs: {{{role}: STAGE, ...}})"
    )


def adapter_dir(upstream: Mapping[str, Upstream], kind: str, only: bool = True, role: str = ADAPTER) -> Path:
    """`<dir>/adapter/` of the upstream in `role` (or, when `only`, of the only upstream)."""
    source = find_upstream(upstream, role, kind, only)
    path = source.dir / ADAPTER
    if not (path / "adapter_config.json").is_file():
        raise StageError(
            f"upstream stage {source.name!r} has no peft adapter at {path} "
            "(expected adapter_config.json there, as written by save_pretrained)"
        )
    return path
