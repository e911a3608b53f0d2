"""Assemble one spec document: `include:` fragments first, then the file, then a profile."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from harness.spec.errors import SpecError
from harness.spec.yamlload import Document, SpecPath, load_yaml


def deep_merge(base: Document, over: Document) -> Document:
    """Mappings merge key by key; anything else in `over` replaces what `base` had."""
    data = _merge(base.data, over.data)
    marks: dict[SpecPath, Any] = {}
    _collect_marks(data, (), base, over, marks)
    return Document(data, marks)


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(over)


def _collect_marks(data: Any, path: SpecPath, base: Document, over: Document, marks: dict) -> None:
    # A path present in `over` came from it (merged or replaced); otherwise it came from `base`.
    mark = over.marks.get(path) or base.marks.get(path)
    if mark is not None:
        marks[path] = mark
    if isinstance(data, dict):
        for key, value in data.items():
            _collect_marks(value, path + (key,), base, over, marks)
    elif isinstance(data, list):
        for index, value in enumerate(data):
            _collect_marks(value, path + (index,), base, over, marks)


def load_with_includes(file: Path, _stack: tuple[Path, ...] = ()) -> Document:
    """Load `file`, merged over its `include:` fragments (paths relative to the file)."""
    file = file.resolve()
    doc = load_yaml(file)
    if not isinstance(doc.data, dict):
        raise SpecError.at("a spec must be a YAML mapping with at least `stages:`", doc.mark(()))
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
            found = path.is_file()
        except (OSError, ValueError) as exc:  # NUL bytes, names too long, ...
            raise SpecError.at(f"unusable include path {name!r}: {exc}", where, "include") from None
        if path in _stack or path == file:
            chain = " -> ".join(p.name for p in (*_stack, file, path))
            raise SpecError.at(f"include cycle: {chain}", where, "include")
        if not found:
            raise SpecError.at(f"included file not found: {name} (looked for {path})", where, "include")
        merged = deep_merge(merged, load_with_includes(path, (*_stack, file)))
    doc.marks = {p: m for p, m in doc.marks.items() if p[:1] != ("include",)}
    return deep_merge(merged, doc)


def apply_profile(doc: Document, profile: str | None) -> Document:
    """The spec without `profiles:`, with the named profile's overrides merged in."""
    profiles = doc.data.get("profiles") or {}
    base = Document(
        {k: v for k, v in doc.data.items() if k != "profiles"},
        {p: m for p, m in doc.marks.items() if p[:1] != ("profiles",)},
    )
    if profile is None:
        return base
    if not isinstance(profiles, dict) or profile not in profiles:
        known = ", ".join(sorted(profiles)) if isinstance(profiles, dict) and profiles else "none"
        raise SpecError.at(
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
    over = Document(
        body,
        {p[2:]: m for p, m in doc.marks.items() if p[:2] == prefix},
    )
    return deep_merge(base, over)
