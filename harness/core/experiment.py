"""A resolved, validated experiment: what a spec file means, ready to run."""

from __future__ import annotations

from dataclasses import dataclass, field
from difflib import get_close_matches
from pathlib import Path
from typing import Any

from harness.core import registry
from harness.core.gates import Gate, GateSyntaxError, parse_gate
from harness.core.graph import StageGraph
from harness.core.stage import ParamError, StageKind
from harness.core.upstream import unfilled
from harness.hypotheses.plan import HypothesisPlan, parse_plan
from harness.spec.compose import apply_profile, load_with_includes
from harness.spec.errors import Mark, Problem, SpecError, source_line
from harness.spec.matrix import expand_matrices
from harness.spec.validate import EXPERIMENT_SCHEMA, check, dotted, is_name
from harness.spec.yamlload import Document

DEFAULT_SEED = 0


@dataclass(frozen=True)
class StageSpec:
    name: str
    kind: StageKind
    params: dict[str, Any]  # as written (after profile merge), the schema's defaults filled
    needs: dict[str, str]  # role -> upstream stage
    gates: tuple[Gate, ...]
    inputs: dict[str, Path] = field(default_factory=dict)  # "param[.key]" -> resolved path
    mark: Mark | None = None
    description: str = ""
    seed: int | None = None  # this stage's own seed; None: the experiment's
    resources: dict[str, float] = field(default_factory=dict)  # for a cluster executor; not in the key


@dataclass(frozen=True)
class Experiment:
    name: str
    file: Path
    profile: str | None
    seed: int
    stages: dict[str, StageSpec]  # in run order
    description: str = ""
    hypotheses: HypothesisPlan | None = None

    @property
    def profile_dir(self) -> str:
        return self.profile or "default"


def load_experiment(file: Path, profile: str | None = None, machine_checks: bool = True) -> Experiment:
    """Load, merge and validate a spec; every user error raises SpecError with file:line.
    Without `machine_checks`, the kinds' own checks of this machine (models, API keys,
    modules) are left out: what locking a plan that runs elsewhere needs."""
    file = Path(file).resolve()
    doc = load_with_includes(file)
    resolved = _check_every_profile(doc, profile)
    data = resolved.data
    problems: list[Problem] = []
    try:
        experiment_name = _experiment_name(data, file)
    except SpecError as exc:
        problems.extend(exc.problems)
    stages: dict[str, StageSpec] = {}
    for name, body in data["stages"].items():
        try:
            stages[name] = _stage(name, body, resolved, file, machine_checks)
        except SpecError as exc:
            problems.extend(exc.problems)
    seed = data.get("seed", DEFAULT_SEED)
    try:
        hypotheses = parse_plan(data, resolved, data["stages"], seed)
    except SpecError as exc:
        problems.extend(exc.problems)
    if problems:
        raise SpecError(problems)

    def edge_mark(stage: str, role: str) -> Mark | None:
        needs = data["stages"][stage].get("needs")
        path = ("stages", stage, "needs", needs.index(role) if isinstance(needs, list) else role)
        return resolved.mark(path)

    graph = StageGraph({n: s.needs for n, s in stages.items()}, edge_mark)
    return Experiment(
        name=experiment_name,
        file=file,
        profile=profile,
        seed=seed,
        stages={n: stages[n] for n in graph.order},
        description=data.get("description", ""),
        hypotheses=hypotheses,
    )


def _experiment_name(data: dict, file: Path) -> str:
    """`experiment:`, else the file's name without extension. It names the experiment's
    store, so it follows the rule of stage names: a file `...yaml` would be named `..`."""
    if "experiment" in data:
        return data["experiment"]  # checked by the schema
    if not is_name(file.stem):
        raise SpecError.at(
            f"the experiment is named after its file, and {file.stem!r} is not a valid name "
            "(a letter or _, then letters, digits, _ or -): set `experiment:` in the spec",
            Mark(file, 1, 1),
        )
    return file.stem


def load_plan(file: Path, profile: str | None = None) -> Experiment:
    """The experiment with its hypotheses' plan, checked as far as it can be without this
    machine's models or API keys: locking the plan of a profile that runs elsewhere needs
    none of them (its input files and code, which the lock covers, are in the checkout)."""
    return load_experiment(file, profile, machine_checks=False)


def _check_every_profile(doc: Document, selected: str | None) -> Document:
    """The selected profile applied to the spec and its matrices expanded (harness.spec.matrix),
    once typos anywhere are ruled out: the schema, the matrices and the static stage checks
    (kinds, params, gates) run on the base spec and on every profile. Checks that depend on
    this machine (input files, modules) run for the selected profile only, when its stages
    are built."""
    problems = check(doc.data, EXPERIMENT_SCHEMA, doc)  # the base spec, and profiles' shape
    if problems:
        raise SpecError(problems)
    resolved = base = None
    for name in [None, *(doc.data.get("profiles") or {})]:
        merged = apply_profile(doc, name)
        found = check(merged.data, EXPERIMENT_SCHEMA, merged) if name is not None else []
        if not found:
            try:
                merged = expand_matrices(merged)
            except SpecError as exc:
                found = exc.problems
        if name == selected:
            resolved = merged
        elif not found:
            found = _static_problems(merged, base)
        base = base or merged
        problems += [p for p in found if p not in problems]
    if problems:
        raise SpecError(problems)
    return resolved or apply_profile(doc, selected)  # an unknown profile raises here


def _static_problems(merged: Document, base: Document | None) -> list[Problem]:
    """The static stage checks and the analysis plan of a profile applied to the spec
    (`merged`). What a profile leaves untouched is the base spec's own object, already
    checked with it: only what it changes is checked again, so a spec's profiles cost
    what they change, not the whole spec each."""
    found: list[Problem] = []
    stages = merged.data["stages"]
    changed = {n: b for n, b in stages.items() if base is None or base.data["stages"].get(n) is not b}
    for stage, body in changed.items():
        try:
            _static_checks(stage, body, merged)
        except SpecError as exc:
            found += exc.problems
    plan_inputs = ("hypotheses", "seed")
    if base is None or changed or any(merged.data.get(k) is not base.data.get(k) for k in plan_inputs):
        try:
            parse_plan(merged.data, merged, stages, merged.data.get("seed", DEFAULT_SEED))
        except SpecError as exc:
            found += exc.problems
    return found


def _static_checks(name: str, body: dict, doc: Document) -> tuple[StageKind, dict, tuple[Gate, ...]]:
    """The stage's kind, params (the schema's defaults filled: the run, its cache key and its
    manifest see what the stage uses, not only what was written) and gates, checked without
    touching the file system."""
    at = ("stages", name)
    kind = registry.get(body["kind"])
    if kind is None:
        known = registry.names()
        hint = get_close_matches(body["kind"], known, n=1)
        extra = f"did you mean {hint[0]!r}? " if hint else ""
        raise SpecError.at(
            f"unknown stage kind {body['kind']!r}; {extra}known kinds: {', '.join(known)}",
            doc.mark(at + ("kind",)),
            dotted(at + ("kind",)),
        )
    params = body.get("params", {})
    problems = check(params, kind.params_schema, doc, at + ("params",)) if kind.params_schema else []
    if problems:
        raise SpecError(problems)
    params = kind.filled(params)
    problems = _unfilled_roles(name, kind, params, _needs(body), doc)
    try:
        gates = _gates(name, body.get("gates", []), kind.produces(params), doc)
    except SpecError as exc:
        problems += exc.problems
    if problems:
        raise SpecError(problems)
    return kind, params, gates


def _needs(body: dict) -> dict[str, str]:
    """The stage's `needs` as role -> upstream stage (a list names each stage in its own role)."""
    needs = body.get("needs", [])
    return {n: n for n in needs} if isinstance(needs, list) else dict(needs)


def _unfilled_roles(
    name: str, kind: StageKind, params: dict, needs: dict[str, str], doc: Document
) -> list[Problem]:
    """The upstream roles the kind reads that `needs` leaves unfilled: at `needs:` (or the stage)
    for the kind's own roles, at the param that names one (em_eval's `settings`) for the others."""
    problems = []
    for role in unfilled(kind.roles(params), needs):
        add = f"add `{role.name}: STAGE` to `needs`" if needs else f"add `needs: {{{role.name}: STAGE}}`"
        if role.named_at is None:
            path = ("stages", name, "needs")
            message = f"{kind.name} needs the role `{role.name}` ({role.reads}), which `needs` "
            message += f"does not fill: {add}"
        else:
            path = ("stages", name, "params", *role.named_at)
            message = (
                f"{dotted(role.named_at)} names the role `{role.name}`, which `needs` does not fill "
                f"({kind.name} reads there {role.reads}): {add}"
            )
        problems.append(Problem(message, doc.mark(path), dotted(path)))
    return problems


def _stage(name: str, body: dict, doc: Document, file: Path, machine_checks: bool = True) -> StageSpec:
    kind, params, gates = _static_checks(name, body, doc)
    at = ("stages", name)
    try:  # inputs first: a kind's check reads files known to be there and regular
        inputs = _input_paths(kind, params, file.parent)
        if kind.check and machine_checks:
            kind.check(params, file.parent)
    except ParamError as exc:
        path = at + ("params",) + exc.path
        raise SpecError.at(exc.message, doc.mark(path), dotted(path)) from None
    return StageSpec(
        name=name,
        kind=kind,
        params=params,
        needs=_needs(body),
        gates=gates,
        inputs=inputs,
        mark=doc.mark(at),
        description=body.get("description", ""),
        seed=body.get("seed"),
        resources={**kind.resources, **body.get("resources", {})},
    )


def _gates(stage: str, texts: list[str], produced: frozenset[str], doc: Document) -> tuple[Gate, ...]:
    gates, problems = [], []
    for index, text in enumerate(texts):
        path = ("stages", stage, "gates", index)
        mark = doc.mark(path)
        try:
            gate = parse_gate(text, mark)
        except GateSyntaxError as exc:
            col = None
            if mark:  # the column inside the gate text, past an opening quote if written quoted
                quoted = source_line(mark)[mark.column - 1 : mark.column] in ("'", '"')
                col = Mark(mark.file, mark.line, mark.column + exc.column - 1 + quoted)
            problems.append(Problem(f"bad gate {text!r}: {exc}", col, dotted(path)))
            continue
        unknown = [name for name in gate.metrics if name not in produced]
        if unknown:
            known = ", ".join(sorted(produced)) or "none"
            problems.append(
                Problem(
                    f"gate on metric {unknown[0]!r}, which this stage kind does not produce "
                    f"(it produces: {known})",
                    mark,
                    dotted(path),
                )
            )
            continue
        gates.append(gate)
    if problems:
        raise SpecError(problems)
    return tuple(gates)


def _input_paths(kind: StageKind, params: dict, base: Path) -> dict[str, Path]:
    """Resolve the params that name input files; a missing one, or one that is not a regular
    file (a device reads forever, a directory where a file is meant hashes a tree), is a
    ParamError at its line. Params in `kind.input_dirs` may name a directory."""
    out: dict[str, Path] = {}
    for param in kind.input_params:
        value = params.get(param)
        if value is None:
            continue
        items = (
            value.items()
            if isinstance(value, dict)
            else enumerate([value] if isinstance(value, str) else value)
        )
        for sub, rel in items:
            path = (param,) if isinstance(value, str) else (param, sub)
            try:
                resolved = (base / rel).resolve()
                found, is_file, is_dir = resolved.exists(), resolved.is_file(), resolved.is_dir()
            except (OSError, ValueError) as exc:  # NUL bytes, names too long, ...
                reason = getattr(exc, "strerror", None) or exc  # not the 5,000-character name again
                raise ParamError(path, f"unusable input path {_shown(rel)}: {reason}") from None
            if not found:
                raise ParamError(path, f"input not found: {rel} (looked for {resolved})")
            if param in kind.input_dirs and not (is_file or is_dir):
                raise ParamError(path, f"{rel} is neither a regular file nor a directory ({resolved})")
            if param not in kind.input_dirs and not is_file:
                what = "a directory" if is_dir else "a device or other special file"
                raise ParamError(path, f"{rel} is not a regular file but {what} ({resolved}); name a file")
            out[".".join(map(str, path))] = resolved
    return out


def _shown(text: str, limit: int = 200) -> str:
    """`text` quoted, cut in the middle past `limit` characters (a 5,000-character path)."""
    return repr(text) if len(text) <= limit else f"{text[: limit // 2]!r}...{text[-limit // 2 :]!r}"
