"""Assemble one spec document: `include:` fragments first, then the file, then a profile."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.spec.errors import Mark, SpecError, UnknownProfile, allow_quoting, near_names
from harness.spec.yamlload import Document, SpecPath, load_yaml


def deep_merge(base: Document, over: Document) -> Document:
    """Mappings merge key by key; anything else in `over` replaces what `base` had. A value
    keeps the mark of where it was written. The work grows with `over`, not with `base`:
    a spec is merged with each of its profiles in turn."""
    marks = dict(base.marks)
    data = _merge(base.data, over.data, (), marks)
    marks.update(over.marks)
    return Document(data, marks)


def _merge(base: Any, over: Any, path: SpecPath, marks: dict[SpecPath, Mark]) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = _merge(base[key], value, path + (key,), marks) if key in base else copy.deepcopy(value)
        return out
    for replaced in _paths(base, path):  # what `over` replaces goes, with its marks
        marks.pop(replaced, None)
    return copy.deepcopy(over)


def _paths(value: Any, path: SpecPath) -> Iterator[SpecPath]:
    """`path` and the paths of everything inside `value`, which lies at `path`."""
    yield path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        yield from _paths(item, path + (key,))


def load_with_includes(file: Path) -> Document:
    """Load `file`, merged over its `include:` fragments (paths relative to the file)."""
    file = file.resolve()
    allow_quoting(file)  # the user passed it: errors may show its lines
    doc = load_yaml(file)
    if not isinstance(doc.data, dict):
        raise SpecError.at("a spec must be a YAML mapping with at least `stages:`", doc.mark(()))
    return _with_includes(doc, file, file.parent, ())


def _with_includes(doc: Document, file: Path, project: Path, stack: tuple[Path, ...]) -> Document:
    """`doc`, read from `file`, merged over its fragments; `project` is the directory of the
    spec the user passed: fragments elsewhere are used but never quoted."""
    includes = doc.data.pop("include", None)
    if includes is None:
        return doc
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise SpecError.at(
            "`include` must be a file path or a list of file paths",
            doc.mark(("include",)),
            "include",
        )
    merged = Document({}, {})
    for index, name in enumerate(includes):
        where = doc.mark(("include", index)) or doc.mark(("include",))
        try:
            path = (file.parent / name).resolve()
            found = path.exists()
        except (OSError, ValueError) as exc:  # NUL bytes, names too long, ...
            raise SpecError.at(f"unusable include path {name!r}: {exc}", where, "include") from None
        if path in stack or path == file:
            chain = " -> ".join(p.name for p in (*stack, file, path))
            raise SpecError.at(f"include cycle: {chain}", where, "include")
        if not found:
            message = f"included file not found: {name} (looked for {path}){near_names(path)}"
            raise SpecError.at(message, where, "include")
        fragment = _fragment(path, name, where, path.is_relative_to(project))
        merged = deep_merge(merged, _with_includes(fragment, path, project, (*stack, file)))
    doc.marks = {p: m for p, m in doc.marks.items() if p[:1] != ("include",)}
    return deep_merge(merged, doc)


def _fragment(path: Path, name: str, where: Mark | None, in_project: bool) -> Document:
    """The included file `path` as a spec fragment: a YAML mapping. A file that is not one
    is refused at the `include:` line, saying nothing of what it holds."""
    try:
        doc = load_yaml(path, quote_if_mapping=in_project)
    except SpecError as exc:
        first = exc.problems[0]
        if first.mark is None:  # unreadable, too large, not a regular file: nothing of its content
            raise SpecError.at(f"include {name!r}: {first.message}", where, "include") from None
        if in_project:  # the user's own fragment: the loader's message, quoted if it is a mapping
            raise
        raise SpecError.at(
            f"included file {name} is not a spec fragment: invalid YAML at {first.mark}", where, "include"
        ) from None
    if not isinstance(doc.data, dict):
        raise SpecError.at(
            f"included file {name} is not a spec fragment: a fragment must be a YAML mapping",
            where,
            "include",
        )
    return doc


def apply_profile(doc: Document, profile: str | None) -> Document:
    """The spec without `profiles:`, with the named profile's overrides merged in."""
    profiles = doc.data.get("profiles") or {}
    marks = dict(doc.marks)
    for path in _paths(profiles, ("profiles",)):
        marks.pop(path, None)
    base = Document({k: v for k, v in doc.data.items() if k != "profiles"}, marks)
    if profile is None:
        return base
    if not isinstance(profiles, dict) or profile not in profiles:
        known = ", ".join(sorted(profiles)) if isinstance(profiles, dict) and profiles else "none"
        raise UnknownProfile.at(
            f"unknown profile {profile!r}; this spec defines: {known}",
            doc.mark(("profiles",)) or doc.mark(()),
        )
    body = profiles[profile]
    prefix = ("profiles", profile)
    if not isinstance(body, dict):
        raise SpecError.at(
            "a profile must be a mapping of overrides", doc.mark(prefix), f"profiles.{profile}"
        )
    nested = sorted({"profiles", "include"} & set(body))
    if nested:
        raise SpecError.at(
            f"a profile cannot contain `{nested[0]}:`",
            doc.mark(prefix + (nested[0],)),
            f"profiles.{profile}",
        )
    over = Document(body, {p[2:]: doc.marks[p] for p in _paths(body, prefix) if p in doc.marks})
    return deep_merge(base, over)
