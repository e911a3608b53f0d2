"""Safe YAML loading that keeps the source position of every key and list item."""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.spec.errors import Mark, SpecError, allow_quoting

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

SpecPath = tuple  # a path inside the document: ("stages", "train", "gates", 0)

# Bounds that keep loading any file fast (well under a second) and small; the shipped
# specs are under 20 KB, with a few hundred values nested 8 deep.
MAX_SPEC_BYTES = 256 * 2**10
MAX_VALUES = 20_000  # values built, each alias counted again at every expansion
MAX_DEPTH = 50  # levels of mappings and lists


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


def load_yaml(file: Path, quote_if_mapping: bool = False) -> Document:
    """Load one YAML file with safe_load semantics; errors become SpecError with file:line.
    With `quote_if_mapping`, error snippets may show the file's lines once it parses as a
    YAML mapping (a spec fragment), not before: an included `/etc/passwd` shows nothing."""
    text = _read_text(file)
    loader = _Loader(text)
    node = None
    try:
        node = loader.get_single_node()
        if node is None:
            return Document(None, {(): Mark(file, 1, 1)})
        if quote_if_mapping and isinstance(node, yaml.MappingNode):
            allow_quoting(file)
        builder = _Builder(loader, file)
        data = builder.value(node)
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
    return Document(data, builder.marks)


def _read_text(file: Path) -> str:
    """The text of `file` if it is a regular file within MAX_SPEC_BYTES. Nothing else is
    read: a fifo blocks, a device like /dev/zero never ends, and a /proc file is not the
    size it says (its length is checked against that size)."""
    try:
        # non-blocking: opening a fifo would otherwise wait for a writer
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise SpecError.at(f"file not found: {file}") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        raise SpecError.at(f"cannot read {file}: {exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SpecError.at(f"{file} is not a regular file")
        if info.st_size > MAX_SPEC_BYTES:
            raise SpecError.at(
                f"{file} is larger than the {MAX_SPEC_BYTES // 2**10} KiB a spec file may hold"
            )
        with os.fdopen(os.dup(fd), "rb") as stream:
            data = stream.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise SpecError.at(f"cannot read {file}: {exc}") from None
    finally:
        os.close(fd)
    if len(data) != info.st_size:
        raise SpecError.at(
            f"{file} is not a regular file: it holds {len(data)} bytes where its size says "
            f"{info.st_size} (a /proc or /sys file?)"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError.at(f"cannot read {file}: {exc}") from None


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


class _Builder:
    """Builds a document's value by the project's own rules, recording marks on the way.

    A spec holds JSON data (its params are hashed into cache keys and written to
    manifests): keys are strings, values strings, finite numbers within 64 bits, booleans,
    null, and plain mappings and lists; anything else (`2024-01-01`, a date to YAML, `.nan`,
    `!!set`) is refused where it is written, instead of failing when a stage runs.
    Duplicate keys, which safe_load would silently overwrite, are refused. Merge keys follow
    YAML 1.1's rule whatever PyYAML version is installed: explicit keys beat merged ones,
    and in `<<: [*a, *b]` the first mapping that has a key wins. Marks follow the value.

    Every value built counts toward MAX_VALUES, an alias's once per expansion: aliases
    nest, so a few kilobytes can stand for billions of values ("billion laughs").
    """

    def __init__(self, loader: Any, file: Path):
        self.loader = loader
        self.file = file
        self.marks: dict[SpecPath, Mark] = {}
        self.count = 0
        self.built: set[int] = set()  # collections built once: meeting one again expands an alias
        self.expanding: yaml.Node | None = None  # the outermost alias being expanded

    def value(self, node: yaml.Node, path: SpecPath = (), stack: tuple = ()) -> Any:
        if id(node) in stack:
            raise SpecError.at("recursive YAML alias", _mark(node, self.file))
        is_alias = id(node) in self.built and self.expanding is None
        if is_alias:
            self.expanding = node
        try:
            self._count(node, path)
            return self._build(node, path, stack + (id(node),))
        finally:
            if is_alias:
                self.expanding = None

    def _count(self, node: yaml.Node, path: SpecPath) -> None:
        self.count += 1
        if self.count > MAX_VALUES:
            if self.expanding is not None:
                raise SpecError.at(
                    f"YAML aliases expand to more than {MAX_VALUES:,} values: the anchor here "
                    "is repeated too often, directly or through other anchors",
                    _mark(self.expanding, self.file),
                )
            raise SpecError.at(f"the document holds more than {MAX_VALUES:,} values", _mark(node, self.file))
        if len(path) > MAX_DEPTH:
            raise SpecError.at(
                f"nesting too deep: more than {MAX_DEPTH} levels of mappings and lists",
                _mark(node, self.file),
            )

    def _build(self, node: yaml.Node, path: SpecPath, stack: tuple) -> Any:
        self.marks.setdefault(path, _mark(node, self.file))
        if isinstance(node, yaml.MappingNode) and node.tag == _MAP:
            self.built.add(id(node))
            return self._mapping(node, path, stack)
        if isinstance(node, yaml.SequenceNode) and node.tag == _SEQ:
            self.built.add(id(node))
            return [self.value(item, path + (i,), stack) for i, item in enumerate(node.value)]
        if not isinstance(node, yaml.ScalarNode):
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise SpecError.at(
                f"`{tag}` is not allowed: a spec holds plain mappings and lists", _mark(node, self.file)
            )
        return self._scalar(node)

    def _scalar(self, node: yaml.ScalarNode) -> Any:
        value = self.loader.construct_object(node)
        problem = _not_json(value, node.value)
        if problem:
            raise SpecError.at(problem, _mark(node, self.file))
        return value

    def _mapping(self, node: yaml.MappingNode, path: SpecPath, stack: tuple) -> dict:
        value: dict[Any, Any] = {}
        seen: dict[Any, Mark] = {}
        merged: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise SpecError.at("mapping keys must be plain scalars", _mark(key_node, self.file))
            if key_node.tag == _MERGE:
                merged.extend(value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node])
                continue
            key = self._scalar(key_node)
            if not isinstance(key, str):
                raise SpecError.at(
                    f"mapping keys must be strings: `{_short(key_node.value)}` is read as a "
                    f"{type(key).__name__}; quote it",
                    _mark(key_node, self.file),
                )
            if key in seen:
                raise SpecError.at(
                    f"duplicate key {key!r} (first defined at line {seen[key].line})",
                    _mark(key_node, self.file),
                )
            seen[key] = _mark(key_node, self.file)
            self.marks.setdefault(path + (key,), seen[key])
            value[key] = self.value(value_node, path + (key,), stack)
        for merged_node in merged:
            if not (isinstance(merged_node, yaml.MappingNode) and merged_node.tag == _MAP):
                raise SpecError.at(
                    "`<<` merges a mapping or a list of mappings", _mark(merged_node, self.file)
                )
            for key, item in self.value(merged_node, path, stack).items():
                value.setdefault(key, item)
        return value


def _not_json(value: Any, text: str) -> str:
    """Why the scalar written as `text` cannot stand in a spec, or "" if it can."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "a lone surrogate (such as `\\ud800`) cannot be written to any file"
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return f"`{_short(text)}` is not a finite number"
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        return f"`{_short(text)}` is beyond a 64-bit integer"
    if value is None or isinstance(value, (bool, int, float)):
        return ""
    kind = type(value).__name__
    return f"`{_short(text)}` is read as a {kind}, which is not JSON data; quote it to keep it as text"


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
