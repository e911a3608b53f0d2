"""Stage kinds by name: the built-in modules of `harness.stages` and the
`harness.stages` entry-point group for third-party kinds."""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

from harness.stage import StageKind

ENTRY_POINT_GROUP = "harness.stages"

_kinds: dict[str, StageKind] = {}
_loaded = False


def register(kind: StageKind) -> StageKind:
    existing = _kinds.get(kind.name)
    if existing is not None and existing is not kind:
        raise ValueError(f"stage kind {kind.name!r} is registered twice")
    _kinds[kind.name] = kind
    return kind


def kinds() -> dict[str, StageKind]:
    _load()
    return dict(_kinds)


def get(name: str) -> StageKind | None:
    _load()
    return _kinds.get(name)


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import harness.stages as builtin

    for info in pkgutil.iter_modules(builtin.__path__):
        module = importlib.import_module(f"{builtin.__name__}.{info.name}")
        if isinstance(getattr(module, "KIND", None), StageKind):
            register(module.KIND)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = entry.load()
        except Exception as exc:  # a broken plugin must name itself
            raise RuntimeError(
                f"cannot load stage kind {entry.name!r} from entry point {entry.value!r}: {exc}"
            ) from exc
        kind = getattr(obj, "KIND", obj)
        if not isinstance(kind, StageKind):
            raise RuntimeError(f"entry point {entry.value!r} is not a StageKind")
        register(kind)
