"""Stage kinds by name, loaded when a spec names them: the built-in modules of
`harness.stages` (kind `x` is the module `harness.stages.x`), the `harness.stages`
entry-point group of installed packages (an entry named after its kind), and kinds that
a conftest.py or plugin registers through the `pytest_harness_stage_kinds` hook.

Collection imports only the modules of the kinds its specs use: a kind module may be slow
to import, and one that is broken breaks only the specs that use it."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType

from harness.core.stage import StageKind

ENTRY_POINT_GROUP = "harness.stages"
BUILTIN = "harness.stages"  # by name: the engine imports a kind module only when a spec uses it

_kinds: dict[str, StageKind] = {}


def register(kind: StageKind) -> StageKind:
    existing = _kinds.get(kind.name)
    if existing is not None and existing is not kind:
        raise ValueError(f"stage kind {kind.name!r} is registered twice")
    _kinds[kind.name] = kind
    return kind


def unregister(kind: StageKind) -> None:
    """Forget a kind registered for one pytest session (a conftest's)."""
    if _kinds.get(kind.name) is kind:
        del _kinds[kind.name]


def get(name: str) -> StageKind | None:
    """The kind named `name`, its module imported on first use; None when no kind has it."""
    if name not in _kinds:
        if _is_module_name(name) and importlib.util.find_spec(f"{BUILTIN}.{name}"):
            _register_module(importlib.import_module(f"{BUILTIN}.{name}"))
        else:
            for entry in entry_points(group=ENTRY_POINT_GROUP, name=name):
                _register_entry(entry)
    return _kinds.get(name)


def names() -> list[str]:
    """Every kind name there is, sorted, with no kind module imported (for "did you mean")."""
    builtin = importlib.import_module(BUILTIN).__path__
    found = {info.name for info in pkgutil.iter_modules(builtin) if not info.name.startswith("_")}
    found |= {entry.name for entry in entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(found | set(_kinds))


def kinds() -> dict[str, StageKind]:
    """Every kind, each module imported (for checks across all kinds, and their docs)."""
    for name in names():
        get(name)
    return dict(_kinds)


def kinds_in(module: ModuleType) -> list[StageKind]:
    """The kinds a module defines (not those it imports)."""
    return [v for v in vars(module).values() if isinstance(v, StageKind) and v.module == module.__name__]


def _is_module_name(name: str) -> bool:
    return name.isidentifier() and not name.startswith("_")


def _register_module(module: ModuleType) -> None:
    for kind in kinds_in(module):
        register(kind)


def _register_entry(entry: EntryPoint) -> None:
    try:
        obj = entry.load()
    except Exception as exc:  # a broken plugin must name itself
        raise RuntimeError(
            f"cannot load stage kind {entry.name!r} from entry point {entry.value!r}: {exc}"
        ) from exc
    found = kinds_in(obj) if isinstance(obj, ModuleType) else [obj]
    if not found or not all(isinstance(kind, StageKind) for kind in found):
        raise RuntimeError(f"entry point {entry.value!r} is not a StageKind nor a module defining one")
    for kind in found:
        register(kind)
