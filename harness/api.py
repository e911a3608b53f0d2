"""What a stage kind's author needs, in one module (docs/writing-a-stage-kind.md):

    from harness.api import StageContext, stage_kind, write_json

    @stage_kind(metrics=("n_words",), input_params=("text",))
    def run(ctx: StageContext) -> dict:
        ...

stage_kind                 declares the decorated run function a stage kind
StageContext               what the run function receives
Estimate                   what a run would ask of paid APIs (`estimate=`, for --plan)
StageError, ParamError     a failure the user can fix, at run / in `check` at collection
Role, Upstream             an upstream role a kind reads, and what it finds there
find_upstream, adapter_dir, adapter_role
                           the upstream in a role; a trained adapter's directory and role
write_json, write_jsonl, write_text_atomic
                           artifact writers whose readers never see a half-written file
aside                      work done for a stage that is not its own (a model built once and
                           cached): logged on its own lines, left out of its duration
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from harness.core.preflight import lacking
from harness.core.progress import aside
from harness.core.stage import (
    Estimate,
    Metrics,
    ParamError,
    Role,
    StageContext,
    StageError,
    StageKind,
    Upstream,
)
from harness.core.store import write_json, write_jsonl, write_text_atomic
from harness.core.upstream import adapter_dir, adapter_role, find_upstream
from harness.lab.models import ModelNotFound, NotDownloaded, base_fingerprint, check_base
from harness.spec.validate import SPECS_DIR, load_schema

__all__ = [
    "Estimate",
    "Metrics",
    "ParamError",
    "Role",
    "StageContext",
    "StageError",
    "StageKind",
    "Upstream",
    "adapter_dir",
    "adapter_role",
    "aside",
    "find_upstream",
    "stage_kind",
    "write_json",
    "write_jsonl",
    "write_text_atomic",
]

RunFunction = Callable[[StageContext], Metrics]
BESIDE_MODULE = object()  # the default schema: see stage_kind


def stage_kind(
    *,
    name: str | None = None,
    schema: Mapping[str, Any] | Path | None | object = BESIDE_MODULE,
    metrics: tuple[str, ...] | Callable[[Mapping[str, Any]], Iterable[str]] = (),
    needs: tuple[Role, ...] | Callable[[Mapping[str, Any]], Iterable[Role]] = (),
    input_params: tuple[str, ...] = (),
    input_dirs: tuple[str, ...] = (),
    transport_params: tuple[str, ...] = (),
    check: Callable[[Mapping[str, Any], Path], None] | None = None,
    code_version: Callable[[Mapping[str, Any], Path], str] | None = None,
    base: str | None = "base",
    version: str = "1",
    resources: Mapping[str, float] | None = None,
    estimate: Callable[[Mapping[str, Any]], Estimate | None] | None = None,
) -> Callable[[RunFunction], StageKind]:
    """Declare the decorated run function a stage kind; the arguments are StageKind's fields.

    name:   default: the last part of the module's name (`harness.stages.patch`: patch).
    schema: default: `specs/stages/<name>.schema.json` for a built-in kind, else
            `<name>.schema.json` beside the kind's module; None: params are not checked.
    estimate: estimate(params) -> Estimate: the requests, tokens and cost a run would ask of
            paid APIs, shown by `--plan` (input params hold absolute paths, as in a run).
    base:   the param naming the base model the stage loads, when the schema has it: a model
            missing here fails at collection, at that param's line, before the kind's own
            `check`; the fingerprint of its weights here (harness.lab.models) joins the cache key.
            A schema may leave it optional: a stage without it loads no model.
    The decorated function stays callable as the run function.
    """

    def declare(run: RunFunction) -> StageKind:
        kind_name = name or run.__module__.rpartition(".")[2]
        params_schema = _default_schema(run, kind_name) if schema is BESIDE_MODULE else schema
        loaded = load_schema(params_schema) if isinstance(params_schema, Path) else params_schema or {}
        loads_base = base in loaded.get("properties", {})
        return StageKind(
            name=kind_name,
            run=run,
            params_schema=params_schema,
            metrics=metrics,
            version=version,
            needs=needs,
            input_params=input_params,
            input_dirs=input_dirs,
            transport_params=transport_params,
            check=_base_checked(base, check) if loads_base else check,
            code_version=code_version,
            fingerprint=_base_weights(base) if loads_base else None,
            resources=dict(resources or {}),
            estimate=estimate,
            base=base if loads_base else None,
        )

    return declare


def _default_schema(run: RunFunction, name: str) -> Path:
    builtin = run.__module__.startswith("harness.")
    directory = SPECS_DIR / "stages" if builtin else Path(inspect.getfile(run)).parent
    path = directory / f"{name}.schema.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"stage kind {name!r}: no params schema at {path}; write one, or pass `schema=` "
            "(a path, a dict, or None for params that are not checked)"
        )
    return path


def _base_checked(param: str, check: Callable[[Mapping[str, Any], Path], None] | None):
    """`check` after the base model is found here: a missing one fails in seconds, not after
    loading data."""

    def checked(params: Mapping[str, Any], spec_dir: Path) -> None:
        try:
            if param in params:  # a schema may leave it optional (em_eval of provider models)
                check_base(params[param])
        except NotDownloaded as error:  # reported with every other lack of this machine
            if not lacking(error.advice, (param,)):
                raise ParamError((param,), str(error)) from None
        except ModelNotFound as error:
            raise ParamError((param,), str(error)) from None
        if check:
            check(params, spec_dir)

    return checked


def _base_weights(param: str) -> Callable[[Mapping[str, Any]], str]:
    """The fingerprint of the weights the param `param` names (a fixture's recipe hash, a
    directory's listing), so results of replaced weights are not reused."""

    def fingerprint(params: Mapping[str, Any]) -> str:
        return base_fingerprint(params[param]) if param in params else "no base model"

    return fingerprint
