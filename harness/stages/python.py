"""`python`: call `module:function(ctx) -> metrics` named in the spec, for ad-hoc steps.

The module is looked up on sys.path and in the spec's directory. Its source is hashed
into the cache key, so editing it reruns the stage.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness.spec.validate import SPECS_DIR
from harness.stage import ParamError, StageContext, StageError, StageKind

_loaded_sources: dict[str, str] = {}  # module -> source hash it was imported with


def _split(params: Mapping[str, Any]) -> tuple[str, str]:
    module, _, function = params["function"].partition(":")
    return module, function


@contextmanager
def _importable_from(spec_dir: Path) -> Iterator[None]:
    added = str(spec_dir) not in sys.path
    if added:
        sys.path.append(str(spec_dir))
    try:
        yield
    finally:
        if added:
            sys.path.remove(str(spec_dir))


def _module_file(module: str, spec_dir: Path) -> Path:
    with _importable_from(spec_dir):
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        raise ParamError(
            ("function",),
            f"cannot find module {module!r} (looked on sys.path and in {spec_dir})",
        )
    return Path(spec.origin)


def _source_hash(module: str, spec_dir: Path) -> str:
    return hashlib.sha256(_module_file(module, spec_dir).read_bytes()).hexdigest()[:16]


def check(params: Mapping[str, Any], spec_dir: Path) -> None:
    _module_file(_split(params)[0], spec_dir)


def code_version(params: Mapping[str, Any], spec_dir: Path) -> str:
    return "src-" + _source_hash(_split(params)[0], spec_dir)


def run(ctx: StageContext) -> Mapping[str, Any]:
    module_name, name = _split(ctx.params)
    spec_dir = ctx.spec_file.parent
    source = _source_hash(module_name, spec_dir)
    with _importable_from(spec_dir):
        module = importlib.import_module(module_name)
        if _loaded_sources.setdefault(module_name, source) != source:
            module = importlib.reload(module)  # edited since this process imported it
            _loaded_sources[module_name] = source
    function = getattr(module, name, None)
    if not callable(function):
        raise StageError(f"module {module_name!r} has no function {name!r}")
    return function(ctx)


KIND = StageKind(
    name="python",
    run=run,
    params_schema=SPECS_DIR / "stages" / "python.schema.json",
    metrics=lambda params: params.get("metrics", []),
    input_params=("inputs",),
    check=check,
    code_version=code_version,
    description="Call a Python function named in the spec: function(ctx) -> metrics.",
)
