"""Stage matrices: a stage written once with `matrix:`, expanded into one stage per
combination of its variables' values, and the slices that name several of them at once.

    em:
      matrix: {persona: [none, sycophancy], seed: [2026, 2027]}
      needs: {base_adapter: "persona[${persona}]?"}
      seed: ${seed}

gives `em[none,2026]`, `em[none,2027]`, `em[sycophancy,2026]`, `em[sycophancy,2027]`. In a
matrix stage `${var}` is replaced in `needs`, `seed`, `params` and `description` (a value
that is the whole string keeps its type); a `needs` entry ending in `?` is left out where no
stage of that name exists. In any stage's `needs`, a slice (`em[sycophancy,*]`, `em[*]`)
fills one role per matched stage, and a setting (`params.settings`) that names a slice of
those roles becomes one replicate per matched role. Expansion runs on the composed document
(profiles merged): the expanded stages are what the rest of the harness sees, each keeping
the marks of the lines it was written on.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

from harness.spec.errors import Mark, Problem, SpecError
from harness.spec.validate import dotted
from harness.spec.yamlload import Document, SpecPath

MAX_COMBINATIONS = 1000
SUBSTITUTED = ("needs", "seed", "params", "description")
_VARIABLE = re.compile(r"\$\{([^}]*)\}")
_REFERENCE = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_-]*)\[(?P<values>[^\[\]]*)\]")
_VALUE_TEXT = re.compile(r"[A-Za-z0-9_.+-]+")
_SEED_MAX = 2**32 - 1


@dataclass(frozen=True)
class Matrix:
    name: str
    axes: tuple[str, ...]
    combinations: tuple[tuple[Any, ...], ...]

    def stage(self, combination: tuple[Any, ...]) -> str:
        return f"{self.name}[{','.join(value_text(v) for v in combination)}]"


def value_text(value: Any) -> str:
    """How a value appears in a stage name and in a textual substitution."""
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def is_slice(text: str) -> bool:
    found = _REFERENCE.fullmatch(text)
    return bool(found) and "*" in found["values"].split(",")


def expand_matrices(doc: Document) -> Document:
    """`doc` with every matrix stage expanded and every slice resolved; SpecError at the lines
    of whatever is wrong."""
    stages = doc.data["stages"]
    matrices, problems = {}, []
    for name, body in stages.items():
        if "matrix" in body:
            try:
                matrices[name] = _matrix(name, body["matrix"], doc)
            except SpecError as exc:
                problems += exc.problems
    if problems:
        raise SpecError(problems)
    expanded: dict[str, dict] = {}
    marks = dict(doc.marks)
    for name, body in stages.items():
        if name not in matrices:
            problems += _stray_variables(name, body, doc)
            expanded[name] = body
            continue
        matrix = matrices[name]
        template = {k: v for k, v in body.items() if k != "matrix"}
        for combination in matrix.combinations:
            stage = matrix.stage(combination)
            if stage in stages or stage in expanded:
                problems.append(
                    _at(
                        doc,
                        ("stages", name, "matrix"),
                        f"the combination {stage} has the name of another stage",
                    )
                )
                continue
            values = dict(zip(matrix.axes, combination, strict=True))
            try:
                expanded[stage] = _substituted(template, values, ("stages", name), doc)
            except SpecError as exc:
                problems += [p for p in exc.problems if p not in problems]
            _copy_marks(marks, ("stages", name), ("stages", stage))
    if problems:
        raise SpecError(problems)
    out = Document({**doc.data, "stages": expanded}, marks)
    resolver = _Resolver(matrices, expanded, out, _templated_optional(stages, matrices))
    for name in list(expanded):
        expanded[name] = resolver.resolve(name, expanded[name])
    resolver.check_optional()
    if resolver.problems:
        raise SpecError(resolver.problems)
    return out


def _at(doc: Document, path: SpecPath, message: str) -> Problem:
    return Problem(message, doc.mark(path), dotted(path))


def _matrix(name: str, axes: Any, doc: Document) -> Matrix:
    at = ("stages", name, "matrix")
    if not isinstance(axes, dict) or not axes:
        raise SpecError([_at(doc, at, "`matrix` maps each variable to its list of values")])
    problems = []
    for axis, values in axes.items():
        path = at + (axis,)
        if not isinstance(values, list) or not values:
            problems.append(_at(doc, path, f"the matrix variable {axis} needs a non-empty list of values"))
            continue
        seen: dict[str, int] = {}
        for index, value in enumerate(values):
            text = value_text(value) if isinstance(value, str | int | float | bool) else None
            if text is None or not _VALUE_TEXT.fullmatch(text):
                problems.append(
                    _at(
                        doc,
                        path + (index,),
                        f"matrix value {value!r} cannot be part of a stage name: use a number, true/false or "
                        "a word of letters, digits, _ . + -",
                    )
                )
            elif text in seen:
                problems.append(
                    _at(
                        doc,
                        path + (index,),
                        f"matrix value {text} appears twice in {axis} (stage names would collide)",
                    )
                )
            else:
                seen[text] = index
    if problems:
        raise SpecError(problems)
    count = 1
    for values in axes.values():
        count *= len(values)
    if count > MAX_COMBINATIONS:
        raise SpecError([_at(doc, at, f"{count} combinations; a matrix may have at most {MAX_COMBINATIONS}")])
    return Matrix(name, tuple(axes), tuple(itertools.product(*axes.values())))


def _copy_marks(marks: dict[SpecPath, Mark], source: SpecPath, target: SpecPath) -> None:
    n = len(source)
    for path, mark in list(marks.items()):
        if path[:n] == source and path[n : n + 1] != ("matrix",):
            marks[target + path[n:]] = mark


def _substituted(template: dict, values: dict[str, Any], at: SpecPath, doc: Document) -> dict:
    problems: list[Problem] = []

    def walk(value: Any, path: SpecPath, textual: bool) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, path + (k,), textual) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, path + (i,), textual) for i, v in enumerate(value)]
        if not isinstance(value, str) or "${" not in value:
            return value
        unknown = [v for v in _VARIABLE.findall(value) if v not in values]
        if unknown:
            known = ", ".join(values)
            problems.append(
                _at(doc, path, f"unknown matrix variable `${{{unknown[0]}}}`; this matrix has: {known}")
            )
            return value
        whole = _VARIABLE.fullmatch(value)
        if whole and not textual:
            return values[whole[1]]
        return _VARIABLE.sub(lambda m: value_text(values[m[1]]), value)

    out = {
        k: walk(v, at + (k,), k in ("needs", "description")) if k in SUBSTITUTED else v
        for k, v in template.items()
    }
    seed = out.get("seed")
    if (
        not problems
        and "seed" in out
        and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _SEED_MAX)
    ):
        problems.append(
            _at(doc, at + ("seed",), f"seed {seed!r}: a stage's seed is an integer from 0 to {_SEED_MAX}")
        )
    if problems:
        raise SpecError(problems)
    return out


def _templated_optional(stages: dict[str, dict], matrices: dict[str, Matrix]) -> set[SpecPath]:
    """The `needs` entries of matrix stages written with a variable and a closing `?`."""
    found = set()
    for name in matrices:
        needs = stages[name].get("needs") or {}
        entries = enumerate(needs) if isinstance(needs, list) else needs.items()
        for key, value in entries:
            if isinstance(value, str) and "${" in value and value.endswith("?"):
                found.add(("stages", name, "needs", key))
    return found


def _stray_variables(name: str, body: dict, doc: Document) -> list[Problem]:
    """`${...}` in the seed or needs of a stage without `matrix:` has nothing to take a value from."""
    at = ("stages", name)
    needs = body.get("needs") or []
    entries = [(at + ("seed",), body.get("seed"))]
    entries += [(at + ("needs", i), v) for i, v in enumerate(needs)] if isinstance(needs, list) else []
    entries += [(at + ("needs", r), v) for r, v in needs.items()] if isinstance(needs, dict) else []
    return [
        _at(doc, path, f"{value} uses a matrix variable, but stage {name} has no `matrix:`")
        for path, value in entries
        if isinstance(value, str) and "${" in value
    ]


class _Resolver:
    """Resolves the references of each expanded stage: optional entries, slices in `needs`, and
    slices of roles in `params.settings`."""

    def __init__(
        self, matrices: dict[str, Matrix], stages: dict[str, dict], doc: Document, templated: set[SpecPath]
    ):
        self.matrices, self.stages, self.doc, self.templated = matrices, stages, doc, templated
        self.problems: list[Problem] = []
        self.optional: dict[SpecPath, bool] = {}  # a `?` entry of a matrix -> kept somewhere

    def _template(self, path: SpecPath) -> SpecPath:
        """`path` inside the matrix stage a stage was expanded from (where it is written)."""
        stage = path[1].split("[", 1)[0]
        return ("stages", stage, *path[2:]) if stage in self.matrices else path

    def _problem(self, path: SpecPath, message: str) -> None:
        problem = _at(self.doc, self._template(path), message)
        if problem not in self.problems:  # once for a matrix, not once per combination
            self.problems.append(problem)

    def resolve(self, name: str, body: dict) -> dict:
        needs = body.get("needs")
        if needs is None:
            return body
        listed = isinstance(needs, list)
        entries = (
            [(n, n, i) for i, n in enumerate(needs)] if listed else [(r, v, r) for r, v in needs.items()]
        )
        if not any(
            value.endswith("?") or is_slice(value) or value in self.matrices for _, value, _ in entries
        ):
            return body
        at = ("stages", name, "needs")
        resolved: dict[str, str] = {}
        for role, value, key in entries:
            path = at + (key,)
            for filled, stage in self._targets(name, role, value, path, listed):
                if filled in resolved:
                    self._problem(path, f"the role {filled} is filled twice")
                resolved[filled] = stage
                self.doc.marks.setdefault(at + (filled,), self.doc.mark(path))
        body = {**body, "needs": resolved}
        settings = (body.get("params") or {}).get("settings")
        if isinstance(settings, dict):
            replicated = {s: self._setting(name, s, v, resolved) for s, v in settings.items()}
            body["params"] = {**body["params"], "settings": replicated}
        return body

    def _targets(
        self, stage: str, role: str, value: str, path: SpecPath, listed: bool
    ) -> list[tuple[str, str]]:
        optional = value.endswith("?")
        reference = value[:-1] if optional else value
        if optional:
            template = self._template(path)
            if template not in self.templated:
                self._problem(
                    path,
                    "a `?` (left out where no such stage exists) only goes on a value "
                    "that uses a matrix variable, e.g. persona[${persona}]?",
                )
                return []
            if reference not in self.stages and not is_slice(reference):
                self.optional.setdefault(template, False)
                return []
            self.optional[template] = True
        if reference in self.matrices:
            example = self.matrices[reference].stage(self.matrices[reference].combinations[0])
            self._problem(
                path,
                f"{reference} is a matrix: name one of its stages ({example}) or a slice "
                f"({reference}[*] for all of them, * for any value of a variable)",
            )
            return []
        if not is_slice(reference):
            return [(role, reference)]
        matched = self._matching(reference, self.stages, path)
        if matched is None:
            return []
        if not matched and not optional:
            self._problem(path, f"the slice {reference} matches no stage")
        prefix = _REFERENCE.fullmatch(reference)["name"]
        return [(s if listed else role + s[len(prefix) :], s) for s in matched]

    def _matching(self, reference: str, names: Any, path: SpecPath) -> list[str] | None:
        """The names of `names` that the slice `reference` matches; None if it is malformed."""
        found = _REFERENCE.fullmatch(reference)
        prefix, parts = found["name"], found["values"].split(",")
        matrix = self.matrices.get(prefix)
        if matrix is None:
            self._problem(path, f"{reference}: {prefix} is not a matrix stage")
            return None
        if parts != ["*"] and len(parts) != len(matrix.axes):
            form = ",".join(f"<{a}>" for a in matrix.axes)
            self._problem(
                path,
                f"{reference}: {prefix} has {len(matrix.axes)} variables, write "
                f"{prefix}[{form}] with * for any value, or {prefix}[*]",
            )
            return None
        out = []
        for name in names:
            candidate = _REFERENCE.fullmatch(name)
            if candidate is None or candidate["name"] != prefix:
                continue
            values = candidate["values"].split(",")
            if parts == ["*"] or (
                len(values) == len(parts) and all(p in ("*", v) for p, v in zip(parts, values, strict=True))
            ):
                out.append(name)
        return out

    def _setting(self, stage: str, setting: str, value: Any, roles: dict[str, str]) -> Any:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return value
        slices = [i for i, v in enumerate(value) if is_slice(v)]
        if not slices:
            return value
        path = ("stages", stage, "params", "settings", setting)
        if len(slices) > 1:
            self._problem(path, "a setting may name one slice (its replicates), not several")
            return value
        index = slices[0]
        matched = self._matching(value[index], roles, path + (index,))
        if matched is None:
            return value
        if not matched:
            self._problem(
                path + (index,),
                f"the slice {value[index]} matches none of this stage's roles "
                f"({', '.join(roles) or 'none'}): fill them in `needs`",
            )
        for i in range(len(matched)):
            for j in range(len(value)):
                self.doc.marks.setdefault(path + (i, j), self.doc.mark(path + (j,)))
        return [[*value[:index], role, *value[index + 1 :]] for role in matched]

    def check_optional(self) -> None:
        for template, kept in self.optional.items():
            if not kept:
                self._problem(
                    template,
                    "this optional entry names no existing stage in any combination "
                    "of the matrix: is the name misspelt?",
                )
