"""`python`: call `module:function(ctx) -> metrics` named in the spec, for ad-hoc steps.

The module is looked up in the spec's directory first, then on sys.path. Its source is
hashed into the cache key, so editing it reruns the stage.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
from collections.abc import Mapping
from importlib.machinery import PathFinder
from pathlib import Path
from types import ModuleType
from typing import Any

from harness.api import stage_kind
from harness.core.code_digest import source_closure
from harness.core.stage import ParamError, StageContext, StageError


def _split(params: Mapping[str, Any]) -> tuple[str, str]:
    module, _, function = params["function"].partition(":")
    return module, function


def _locate(module: str, spec_dir: Path) -> Path:
    """The file `module` resolves to, the spec's directory first, ignoring sys.modules
    (two specs may each have their own `steps.py`)."""
    search: list[str] | None = [str(spec_dir), *sys.path]
    found = None
    name = ""
    for part in module.split("."):
        name = f"{name}.{part}" if name else part
        # a plain module has no submodules: None would make PathFinder search sys.path
        found = PathFinder.find_spec(name, search) if search is not None else None
        if found is None:
            break
        search = found.submodule_search_locations
    if found is None or not found.origin or not Path(found.origin).is_file():
        raise ParamError(
            ("function",), f"cannot find module {module!r} (looked in {spec_dir} and on sys.path)"
        )
    return Path(found.origin).resolve()


def _import(module: str, spec_dir: Path) -> ModuleType:
    """Import `module` from the file `_locate` finds, re-importing it if the copy in
    sys.modules came from elsewhere or was edited since."""
    file = _locate(module, spec_dir)
    loaded = sys.modules.get(module)
    stale = (
        loaded is None
        or Path(getattr(loaded, "__file__", "") or "").resolve() != file
        or (_mtimes.get(module) != file.stat().st_mtime_ns)
    )
    if stale:
        top = module.split(".")[0]
        for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
            del sys.modules[name]
        sys.path.insert(0, str(spec_dir))
        try:
            loaded = importlib.import_module(module)
        finally:
            sys.path.remove(str(spec_dir))
        _mtimes[module] = file.stat().st_mtime_ns
    return loaded


_mtimes: dict[str, int] = {}


def check(params: Mapping[str, Any], spec_dir: Path) -> None:
    _locate(_split(params)[0], spec_dir)


def code_version(params: Mapping[str, Any], spec_dir: Path) -> str:
    """The user's module and the modules of its package and of the project it imports."""
    module = _split(params)[0]
    _locate(module, spec_dir)  # a missing module is a ParamError naming it
    closure = source_closure(module, [spec_dir, *sys.path])
    return "src-" + hashlib.sha256(json.dumps(closure, sort_keys=True).encode()).hexdigest()[:16]


@stage_kind(
    metrics=lambda params: params.get("metrics", []),
    input_params=("inputs",),
    input_dirs=("inputs",),
    check=check,
    code_version=code_version,
)
def run(ctx: StageContext) -> Mapping[str, Any]:
    module_name, name = _split(ctx.params)
    function = getattr(_import(module_name, ctx.spec_file.parent), name, None)
    if not callable(function):
        raise StageError(f"module {module_name!r} has no function {name!r}")
    return function(ctx)
