"""A resolved, validated experiment: what a spec file means, ready to run."""

from __future__ import annotations

from dataclasses import dataclass, field
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Protocol

from harness.core import registry
from harness.core.gates import Gate, GateSyntaxError, parse_gate
from harness.core.graph import StageGraph
from harness.core.preflight import Missing, located, recorded
from harness.core.stage import ParamError, StageKind
from harness.core.upstream import unfilled
from harness.hypotheses.plan import HypothesisPlan, parse_plan
from harness.spec.compose import apply_profile, load_with_includes
from harness.spec.errors import Mark, Problem, SpecError, did_you_mean, near_names, source_line
from harness.spec.matrix import expand_matrices
from harness.spec.validate import EXPERIMENT_SCHEMA, check, dotted, invalid_paths, is_name
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
    missing: tuple[Missing, ...] = ()  # what this machine lacks to run it (harness.core.preflight)


class Rewrite(Protocol):
    """What replaces parts of a profile's stages before they are built, without editing the
    spec: a rehearsal's stand-ins (harness.rehearsal). Its runs are stored apart, under the
    profile's directory name and `label` (`default.rehearsal`: a dot no profile name holds);
    `record()` (what it replaced) goes into the reports, `lines()` onto the terminal."""

    label: str

    def __call__(self, stage: str, kind: StageKind, params: dict[str, Any]) -> dict[str, Any]: ...

    def record(self) -> dict[str, Any]: ...

    def lines(self) -> list[str]: ...


@dataclass(frozen=True)
class Experiment:
    name: str
    file: Path
    profile: str | None
    seed: int
    stages: dict[str, StageSpec]  # in run order
    description: str = ""
    hypotheses: HypothesisPlan | None = None
    rewrite: Rewrite | None = None  # a rehearsal: gates and hypotheses reported, not required

    @property
    def profile_dir(self) -> str:
        profile = self.profile or "default"
        return f"{profile}.{self.rewrite.label}" if self.rewrite else profile


def load_experiment(
    file: Path, profile: str | None = None, machine_checks: bool = True, rewrite: Rewrite | None = None
) -> Experiment:
    """Load, merge and validate a spec; every user error raises SpecError with file:line, all
    of them at once: each check runs on what the checks before it left readable.
    Without `machine_checks`, the kinds' own checks of this machine (models, API keys,
    modules) are left out: what locking a plan that runs elsewhere needs. `rewrite` changes
    each stage's params (defaults filled) before the machine checks see them."""
    file = Path(file).resolve()
    doc = load_with_includes(file)
    resolved, whole, problems = _check_every_profile(doc, profile)
    if resolved is None:
        raise SpecError(problems)
    data = resolved.data
    try:
        experiment_name = _experiment_name(data, file)
    except SpecError as exc:
        problems.extend(exc.problems)
    stages: dict[str, StageSpec] = {}
    for name, body in data["stages"].items():
        try:
            stages[name] = _stage(name, body, resolved, file, machine_checks, rewrite)
        except SpecError as exc:
            _add_new(problems, exc.problems)
    seed = data.get("seed", DEFAULT_SEED)
    if not whole:  # the plan and the graph name stages left out: they would only echo that
        raise SpecError(problems)
    try:
        hypotheses = parse_plan(data, resolved, data["stages"], seed)
    except SpecError as exc:
        problems.extend(exc.problems)

    def edge_mark(stage: str, role: str) -> Mark | None:
        needs = data["stages"][stage].get("needs")
        path = ("stages", stage, "needs", needs.index(role) if isinstance(needs, list) else role)
        return resolved.mark(path)

    try:
        graph = StageGraph({n: _needs(body) for n, body in data["stages"].items()}, edge_mark)
    except SpecError as exc:
        problems.extend(exc.problems)
    if problems:
        raise SpecError(problems)
    return Experiment(
        name=experiment_name,
        file=file,
        profile=profile,
        seed=seed,
        stages={n: stages[n] for n in graph.order},
        description=data.get("description", ""),
        hypotheses=hypotheses,
        rewrite=rewrite,
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


def _check_every_profile(doc: Document, selected: str | None) -> tuple[Document | None, bool, list[Problem]]:
    """The selected profile applied to the spec and its matrices expanded (harness.spec.matrix),
    with the problems found anywhere: the schema, the matrices and the static stage checks
    (kinds, params, gates) run on the base spec and on every profile. Checks that depend on
    this machine (input files, modules) run for the selected profile only, when its stages
    are built. A stage the schema refuses (beyond an unknown key) is left out of the later
    checks; then the document is not `whole`. None where nothing more can be checked."""
    problems = check(doc.data, EXPERIMENT_SCHEMA, doc)  # the base spec, and profiles' shape
    profiles = doc.data.get("profiles")
    names = (
        [n for n, body in profiles.items() if isinstance(body, dict)] if isinstance(profiles, dict) else []
    )
    resolved, whole, base = None, False, None
    for name in [None, *names]:
        try:
            merged = apply_profile(doc, name)
        except SpecError as exc:  # a profile with `include:` or `profiles:`
            problems += exc.problems
            continue
        shape = check(merged.data, EXPERIMENT_SCHEMA, merged) if name is not None else problems
        problems += shape if name is not None else []
        checkable, complete = _checkable(merged, shape)
        try:
            checkable = checkable and expand_matrices(checkable)
        except SpecError as exc:
            # with stages left out, a slice may match nothing for that reason alone: the
            # matrices are checked once every stage passes the schema
            problems += exc.problems if complete else []
            checkable = None
        if name == selected:
            resolved, whole = checkable, complete
        elif checkable is not None:
            _add_new(problems, _static_problems(checkable, base, complete))
        base = base or checkable
    if not problems and selected is not None and selected not in names:
        apply_profile(doc, selected)  # an unknown profile raises here
    return resolved, whole, problems


def _add_new(problems: list[Problem], found: list[Problem]) -> None:
    """Add to `problems` those of `found` not already there: a stage that a profile changes is
    checked again, and a mistake it keeps from the spec is reported once, where first found."""
    seen = {(p.message, p.where) for p in problems}
    problems += [p for p in found if (p.message, p.where) not in seen]


def _checkable(merged: Document, problems: list[Problem]) -> tuple[Document | None, bool]:
    """`merged` without the stages that its schema `problems` leave unreadable, and whether
    it is whole (nothing is left out, the parts outside the stages included); None where its
    stages themselves cannot be read."""
    if not problems:
        return merged, True
    invalid = invalid_paths(merged.data, EXPERIMENT_SCHEMA)
    if () in invalid or ("stages",) in invalid:
        return None, False
    broken = {path[1] for path in invalid if path[0] == "stages"}
    stages = {n: body for n, body in merged.data["stages"].items() if n not in broken}
    return Document({**merged.data, "stages": stages}, merged.marks), not invalid


def _static_problems(merged: Document, base: Document | None, whole: bool) -> list[Problem]:
    """The static stage checks and the analysis plan of a profile applied to the spec
    (`merged`). What a profile leaves untouched is the base spec's own object, already
    checked with it: only what it changes is checked again, so a spec's profiles cost
    what they change, not the whole spec each. The plan is checked only against a `whole` spec."""
    found: list[Problem] = []
    stages = merged.data["stages"]
    changed = {n: b for n, b in stages.items() if base is None or base.data["stages"].get(n) is not b}
    for stage, body in changed.items():
        _static_checks(stage, body, merged, found)
    plan_inputs = ("hypotheses", "seed")
    replanned = (
        base is None or changed or any(merged.data.get(k) is not base.data.get(k) for k in plan_inputs)
    )
    if whole and replanned:
        try:
            parse_plan(merged.data, merged, stages, merged.data.get("seed", DEFAULT_SEED))
        except SpecError as exc:
            found += exc.problems
    return found


def _static_checks(
    name: str, body: dict, doc: Document, problems: list[Problem]
) -> tuple[StageKind, dict, tuple[Gate, ...]] | None:
    """The stage's kind, params (the schema's defaults filled: the run, its cache key and its
    manifest see what the stage uses, not only what was written) and gates, checked without
    touching the file system. The problems found are added to `problems`; None where the kind
    is unknown or the params break its schema beyond an unknown key: nothing more to check."""
    at = ("stages", name)
    kind = registry.get(body["kind"])
    if kind is None:
        known = registry.names()
        hint = get_close_matches(body["kind"], known, n=1)
        extra = f"did you mean {hint[0]!r}? " if hint else ""
        message = f"unknown stage kind {body['kind']!r}; {extra}known kinds: {', '.join(known)}"
        problems.append(Problem(message, doc.mark(at + ("kind",)), dotted(at + ("kind",))))
        return None
    params = body.get("params", {})
    if kind.params_schema:
        found = check(params, kind.params_schema, doc, at + ("params",))
        problems += found
        if found and invalid_paths(params, kind.params_schema):
            return None
    params = kind.filled(params)
    problems += _unfilled_roles(name, kind, params, _needs(body), doc)
    gates = _gates(name, body.get("gates", []), kind.produces(params), doc, problems)
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


def _stage(
    name: str,
    body: dict,
    doc: Document,
    file: Path,
    machine_checks: bool = True,
    rewrite: Rewrite | None = None,
) -> StageSpec:
    problems: list[Problem] = []
    checked = _static_checks(name, body, doc, problems)
    if checked is None:
        raise SpecError(problems)
    kind, params, gates = checked
    at = ("stages", name)
    with recorded() as lacks:  # keys and models this machine lacks: the plugin reports them all at once
        try:  # inputs first: a kind's check reads files known to be there and regular
            params = rewrite(name, kind, params) if rewrite else params
            inputs = _input_paths(kind, params, file.parent)
            if kind.check and machine_checks:
                kind.check(params, file.parent)
        except ParamError as exc:
            path = at + ("params",) + exc.path
            problems.append(Problem(exc.message, doc.mark(path), dotted(path)))
    if problems:
        raise SpecError(problems)
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
        missing=located(lacks, lambda path: doc.mark(at + ("params",) + path)),
    )


def _gates(
    stage: str, texts: list[str], produced: frozenset[str], doc: Document, problems: list[Problem]
) -> tuple[Gate, ...]:
    """The stage's gates that parse and read metrics its kind produces; the others' problems
    are added to `problems`."""
    gates = []
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
                    f"gate on metric {unknown[0]!r}, which this stage kind does not produce"
                    f"{did_you_mean(unknown[0], produced)} (it produces: {known})",
                    mark,
                    dotted(path),
                )
            )
            continue
        gates.append(gate)
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
                raise ParamError(
                    path, f"input not found: {rel} (looked for {resolved}){near_names(resolved)}"
                )
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
