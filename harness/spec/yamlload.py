"""Safe YAML loading that keeps the source position of every key and list item."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.spec.errors import Mark, SpecError

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

SpecPath = tuple  # a path inside the document: ("stages", "train", "gates", 0)


@dataclass
class Document:
    """Plain data (dicts, lists, scalars) plus the mark of every path in it."""

    data: Any
    marks: dict[SpecPath, Mark] = field(default_factory=dict)

    def mark(self, path: SpecPath) -> Mark | None:
        """The mark of `path`, or of its closest ancestor that has one."""
        path = tuple(path)
        while path not in self.marks and path:
            path = path[:-1]
        return self.marks.get(path)


def load_yaml(file: Path) -> Document:
    """Load one YAML file with safe_load semantics; errors become SpecError with file:line."""
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError.at(f"file not found: {file}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError.at(f"cannot read {file}: {exc}") from None
    loader = _Loader(text)
    node = None
    try:
        node = loader.get_single_node()
        if node is None:
            return Document(None, {(): Mark(file, 1, 1)})
        marks: dict[SpecPath, Mark] = {}
        data = _walk(loader, node, (), file, marks)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        if exc.context_mark and mark.line >= len(text.splitlines()):
            mark = exc.context_mark  # e.g. an unclosed quote: point at where it opened
        where = Mark(file, mark.line + 1, mark.column + 1) if mark else None
        problem = " ".join(p for p in (exc.context, exc.problem) if p) or str(exc)
        if "nesting depth" in problem:  # libyaml's own bound on flow nesting
            problem = "nesting too deep"
        raise SpecError.at(f"invalid YAML: {problem}", where) from None
    except yaml.YAMLError as exc:
        raise SpecError.at(f"invalid YAML: {exc}", Mark(file, 1, 1)) from None
    except RecursionError:
        raise SpecError.at("invalid YAML: nesting too deep", Mark(file, 1, 1)) from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. `2024-02-30`, `!!int seven`
        raise SpecError.at(f"invalid YAML value: {exc}", _unconstructible(node, file)) from None
    finally:
        loader.dispose()
    return Document(data, marks)


def _unconstructible(root: yaml.Node | None, file: Path) -> Mark | None:
    """The first scalar that YAML parses but cannot turn into a value."""
    stack = [root] if root is not None else []
    while stack:
        node = stack.pop(0)
        if isinstance(node, yaml.ScalarNode):
            try:
                _Loader("").construct_object(node)
            except (ValueError, TypeError, OverflowError, yaml.YAMLError):
                return _mark(node, file)
        elif isinstance(node, yaml.MappingNode):
            stack[:0] = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            stack[:0] = list(node.value)
    return Mark(file, 1, 1)


def _mark(node: yaml.Node, file: Path) -> Mark:
    return Mark(file, node.start_mark.line + 1, node.start_mark.column + 1)


_MAP, _SEQ, _MERGE = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:merge"


def _walk(loader: Any, node: yaml.Node, path: SpecPath, file: Path, marks: dict, stack: tuple = ()) -> Any:
    """The value of `node`, built by the project's own rules; records marks on the way.

    Duplicate keys, which safe_load would silently overwrite, are refused; keys are
    compared as the values YAML builds (`true` and `True` are one key). Merge keys follow
    YAML 1.1's rule whatever PyYAML version is installed: explicit keys beat merged ones,
    and in `<<: [*a, *b]` the first mapping that has a key wins. Marks follow the value.
    """
    if id(node) in stack:
        raise SpecError.at("recursive YAML alias", _mark(node, file))
    stack += (id(node),)
    marks.setdefault(path, _mark(node, file))
    if isinstance(node, yaml.MappingNode) and node.tag == _MAP:
        value: dict[Any, Any] = {}
        seen: dict[Any, Mark] = {}
        merged: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise SpecError.at("mapping keys must be plain scalars", _mark(key_node, file))
            if key_node.tag == _MERGE:
                merged.extend(value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node])
                continue
            key = loader.construct_object(key_node)
            if key in seen:
                raise SpecError.at(
                    f"duplicate key {key!r} (first defined at line {seen[key].line})",
                    _mark(key_node, file),
                )
            seen[key] = _mark(key_node, file)
            marks.setdefault(path + (key,), seen[key])
            value[key] = _walk(loader, value_node, path + (key,), file, marks, stack)
        for merged_node in merged:
            if not (isinstance(merged_node, yaml.MappingNode) and merged_node.tag == _MAP):
                raise SpecError.at("`<<` merges a mapping or a list of mappings", _mark(merged_node, file))
            for key, item in _walk(loader, merged_node, path, file, marks, stack).items():
                value.setdefault(key, item)
        return value
    if isinstance(node, yaml.SequenceNode) and node.tag == _SEQ:
        return [_walk(loader, item, path + (i,), file, marks, stack) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)  # scalars and explicitly tagged collections
