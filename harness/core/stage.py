"""The stage contract: what a stage kind declares and what its run function receives.

A stage kind is a run function decorated with `harness.api.stage_kind`, one module per kind:
under `harness/stages/`, in a third-party package exposed through the `harness.stages`
entry-point group, or returned by a `pytest_harness_stage_kinds` hook (a conftest.py).
Collection imports the modules of the kinds a spec uses, so they import heavy libraries
(torch, transformers, ...) inside their run function, not at module level.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from harness.core.code_digest import code_digest
from harness.core.progress import Progress
from harness.spec.validate import load_schema, with_defaults

Metrics = Mapping[str, Any]
T = TypeVar("T")


class ParamError(Exception):
    """A problem in a stage's params found by a kind's `check`; `path` is inside `params`."""

    def __init__(self, path: Iterable[str | int], message: str):
        self.path = tuple(path)
        self.message = message
        super().__init__(message)


class StageError(Exception):
    """A failure a user can fix (missing model, bad data row): shown as its message alone."""


@dataclass(frozen=True)
class Upstream:
    """What a stage sees of a stage it needs: its artifacts directory and metrics."""

    name: str
    kind: str
    dir: Path
    metrics: Metrics


@dataclass
class StageContext:
    experiment: str
    stage: str
    params: dict[str, Any]  # the schema's defaults filled; input params hold absolute paths
    seed: int
    out_dir: Path  # write artifacts here; renamed into the store on success
    scratch_dir: Path  # survives a crashed attempt of the same key, for resuming
    upstream: Mapping[str, Upstream]  # by role (the stage name when `needs` is a list)
    spec_file: Path
    profile: str | None
    log: Callable[[str], None] = print

    def progress(
        self, what: str, unit: str = "items", total: int | None = None, every: float = 5.0
    ) -> Progress:
        """A `progress(done, total)` callback for a long loop, logging throttled lines with a
        rate and the time left: `training: 120/400 steps, 3.1 steps/s, ~1m30s left`."""
        return Progress(self.log, what, unit, total, every=every)

    def track(
        self, items: Iterable[T], what: str, unit: str = "items", total: int | None = None
    ) -> Iterator[T]:
        """`items`, logging the loop's progress as `progress` does (`total` for an iterable
        without len())."""
        return self.progress(what, unit, total).track(items)


@dataclass(frozen=True)
class Estimate:
    """What a stage would ask of paid APIs, from its spec alone (`--plan`): None where a count
    depends on what upstream stages produce, or a model has no known price."""

    requests: int | None
    input_tokens: int | None
    output_tokens: int | None
    cost_usd: float | None
    note: str = ""  # how it was counted, or what it leaves out


@dataclass(frozen=True)
class Role:
    """An upstream role a kind reads: the stage a spec names for it in `needs: {<name>: STAGE}`.

    reads:    what the kind reads there, for messages ("the facts.json of a universe_context stage").
    optional: the kind runs without it.
    only:     an upstream under another name fills it when it is the only one outside the
              kind's other roles (so `needs: [train]` gives `adapter` the stage `train`).
    named_at: the params path that names this role (em_eval's `settings`), where a missing
              role is reported; None: the role is the kind's own, reported at `needs:`.
    """

    name: str
    reads: str
    optional: bool = False
    only: bool = False
    named_at: tuple[str | int, ...] | None = None


@dataclass(frozen=True)
class StageKind:
    """A registered stage kind.

    name:             the `kind:` written in specs.
    run:              run(ctx) -> metrics, a flat mapping of JSON values; a metric that
                      carries a confidence interval is {"value": v, "ci_low": l, "ci_high": h}.
    params_schema:    JSON Schema (draft 2020-12) for `params`, as a dict or a file path.
    metrics:          the metric names it produces, or a function of params returning them.
    version:          an extra salt of the code version, rarely needed: the code version is
                      derived from the source (`harness.core.code_digest`); bump it only to rerun
                      on a change the source does not show (e.g. a library's behaviour).
    needs:            the upstream roles it reads (Role), or a function of params returning
                      them; collection refuses a spec whose `needs:` leaves one unfilled.
                      Roles not declared are accepted (the python kind reads any).
    input_params:     top-level params naming input files (a string, a list or a mapping of
                      strings), resolved relative to the spec file, checked at collection
                      (each a regular file) and hashed into the cache key.
    input_dirs:       those of input_params that may also name a directory (hashed whole).
    transport_params: dotted params that cannot change results (concurrency, timeouts,
                      inference batch size); left out of the cache key. A `*` in a path
                      stands for every key or list item (`settings.*.provider.timeout`).
    check:            extra collection-time checks, check(params, spec_dir), raising ParamError.
    code_version:     code_version(params, spec_dir): a part the module's source cannot show,
                      joined to the derived one (the python kind: the user's module's source).
    fingerprint:      fingerprint(params): what identifies, on this machine, the resources the
                      stage loads (a base model's weights); in the cache key, but not in the
                      pre-registration lock, which names the model by its params.
    resources:        what a run needs on a cluster ({"gpus": 1, "cpus": 4, "memory_gb": 40});
                      a stage's `resources:` overrides them; not in the cache key.
    estimate:         estimate(params): what a run would ask of paid APIs, for `--plan` (Estimate;
                      input params hold absolute paths, as in a run); None: it asks nothing.
    base:             the param naming the base model a stage loads (a rehearsal replaces it).
    """

    name: str
    run: Callable[[StageContext], Metrics]
    params_schema: Mapping[str, Any] | Path | None = None
    metrics: tuple[str, ...] | Callable[[Mapping[str, Any]], Iterable[str]] = ()
    version: str = "1"
    needs: tuple[Role, ...] | Callable[[Mapping[str, Any]], Iterable[Role]] = ()
    input_params: tuple[str, ...] = ()
    input_dirs: tuple[str, ...] = ()
    transport_params: tuple[str, ...] = ()
    check: Callable[[Mapping[str, Any], Path], None] | None = None
    code_version: Callable[[Mapping[str, Any], Path], str] | None = None
    fingerprint: Callable[[Mapping[str, Any]], str] | None = None
    resources: Mapping[str, float] = field(default_factory=dict)
    estimate: Callable[[Mapping[str, Any]], Estimate | None] | None = None
    base: str | None = None

    def __call__(self, ctx: StageContext) -> Metrics:
        """The kind runs as the function it decorates."""
        return self.run(ctx)

    def filled(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """`params` with the schema's defaults filled: what the run, its key and its manifest see."""
        return with_defaults(dict(params), self.params_schema) if self.params_schema else dict(params)

    def produces(self, params: Mapping[str, Any]) -> frozenset[str]:
        names = self.metrics(params) if callable(self.metrics) else self.metrics
        return frozenset(names)

    @property
    def schema(self) -> Mapping[str, Any]:
        """The params schema as a mapping (read once from its file); empty when there is none."""
        schema = self.params_schema
        return load_schema(schema) if isinstance(schema, Path) else schema or {}

    def missing_files(self, out: Path) -> list[str]:
        """The files every run of the kind writes (its schema's `x-files`, globs relative to
        the stage's directory) that `out` lacks."""
        return [glob for glob in self.schema.get("x-files", ()) if not any(out.glob(glob))]

    def roles(self, params: Mapping[str, Any]) -> tuple[Role, ...]:
        """The upstream roles a stage of this kind with these params reads."""
        return tuple(self.needs(params) if callable(self.needs) else self.needs)

    @property
    def module(self) -> str:
        """The module that defines the run function: where the code version is derived from."""
        return getattr(self.run, "__module__", None) or type(self.run).__module__

    def version_for(self, params: Mapping[str, Any], spec_dir: Path) -> str:
        """`<source digest>-<version>[+<code_version(params, spec_dir)>]`: the digest covers the
        kind's module and every project module and package data file it uses (code_digest)."""
        derived = f"{code_digest(self.module)}-{self.version}"
        return f"{derived}+{self.code_version(params, spec_dir)}" if self.code_version else derived
