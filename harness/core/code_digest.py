"""A stage kind's code version, derived from source: edit the code, and its results rerun.

The closure of a module is the module's own source file and, transitively, every module
of the project it imports: imports anywhere in a file count (kinds import heavy
libraries and helpers inside their run function), found by parsing with `ast`, nothing
imported. A string constant that names a project module counts as an import too: it is
what `importlib.import_module` gets (the offline provider's template modules). "The
project" is the top-level package `harness` and the module's own top-level package (a
third-party kind's), never other third-party code. Importing `a.b.c` runs `a/__init__.py`
and `a/b/__init__.py` too: they are in it.

The tiny worlds (`harness.fixtures`, installed from the top-level fixtures/ folder) are left
out: a kind meets one only as a `fixture:` base model, whose recipe hash covers the world's
source and is in the key as the base's fingerprint. Counted as code, an edit of a world would
also rerun every stage on a real model.

Data files: every file that is not Python source in the package directory of a module of
the closure (not recursive; hidden files and compiled caches left out). A prompt or
template kept beside the code that reads it is covered without a declaration; today the
judge's prompts are string constants in `harness/lab/llm/judge.py`, covered as source. Files
outside the packages are inputs: the spec names them and their content is hashed as such.

Names in the closure are paths relative to the package's parent (`harness/lab/em.py`), so two
checkouts of one commit give one version.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import re
import sys
from collections.abc import Sequence
from functools import cache
from importlib.machinery import PathFinder
from pathlib import Path

PROJECT = ("harness",)
# in keys by the base fingerprint (above); named, since a wheel install has them inside harness/
FINGERPRINTED = "harness.fixtures"
_NOT_DATA = (".py", ".pyc", ".pyo")
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


@cache
def closure_of(module: str) -> dict[str, str]:
    """`source_closure(module)` where this process imports from; computed once per process."""
    return source_closure(module)


def code_digest(module: str) -> str:
    """16 hex digits over the closure of `module`: its code version."""
    return hashlib.sha256(json.dumps(closure_of(module), sort_keys=True).encode()).hexdigest()[:16]


def source_closure(module: str, path: Sequence[Path | str] | None = None) -> dict[str, str]:
    """{file name: sha256 of its bytes} of `module`'s closure. `path` is where top-level
    packages are looked up; None: where this process imports them from."""
    roots = (*PROJECT, module.split(".")[0])
    finder = _Finder(None if path is None else [str(p) for p in path])
    closure: dict[str, str] = {}
    packages: dict[str, Path] = {}  # package name -> its directory, for its data files
    pending, seen = [module], set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        found = finder.file(name)
        if found is None:  # a name imported from a module, or not the project's
            continue
        file, is_package = found
        source = file.read_bytes()
        closure[name.replace(".", "/") + ("/__init__.py" if is_package else ".py")] = _sha(source)
        package = name if is_package else name.rpartition(".")[0]
        if package:  # a top-level plain module's directory is no package: no data files
            packages[package] = file.parent
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        pending += [
            n
            for n in (*parents, *_imports(source, package))
            if n.split(".")[0] in roots and not (n + ".").startswith(FINGERPRINTED + ".")
        ]
    for package, directory in packages.items():
        for file in sorted(directory.iterdir()):
            if file.is_file() and not file.name.startswith(".") and file.suffix not in _NOT_DATA:
                closure[f"{package.replace('.', '/')}/{file.name}"] = _sha(file.read_bytes())
    return closure


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@cache  # by content: kinds share most of their closure, and parsing is the slow part
def _imports(source: bytes, package: str) -> tuple[str, ...]:
    """Every module name an import statement in `source` may load (`from a import b`: a and a.b),
    and every dotted name written as a string (modules imported by name)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _DOTTED.fullmatch(node.value):
            names.append(node.value)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package, `level - 1` packages up
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names += [base] + [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]
    return tuple(names)


class _Finder:
    """Source files of modules, found without importing them."""

    def __init__(self, path: list[str] | None):
        self.path = path
        self._tops: dict[str, tuple[list[Path], Path | None]] = {}

    def file(self, name: str) -> tuple[Path, bool] | None:
        """(file, is_package) of `name`'s source, or None when it is no module with a .py file."""
        top, *rest = name.split(".")
        if top not in self._tops:
            self._tops[top] = self._top(top)
        directories, single = self._tops[top]
        for directory in directories:
            base = directory.joinpath(*rest)
            if (base / "__init__.py").is_file():
                return base / "__init__.py", True
            if rest and base.with_suffix(".py").is_file():
                return base.with_suffix(".py"), False
        return (single, False) if single is not None and not rest else None

    def _top(self, top: str) -> tuple[list[Path], Path | None]:
        """The directories of package `top`, or the file of module `top`."""
        loaded = sys.modules.get(top) if self.path is None else None
        if loaded is not None:  # where this process really took it from
            locations, file = getattr(loaded, "__path__", None), getattr(loaded, "__file__", None)
        else:
            try:  # a top-level name: finding it imports nothing
                spec = PathFinder.find_spec(top, self.path) if self.path else importlib.util.find_spec(top)
            except (ImportError, ValueError):
                spec = None
            locations = spec.submodule_search_locations if spec else None
            file = spec.origin if spec else None
        if locations is not None:
            return [Path(p) for p in locations], None
        return [], Path(file) if file and file.endswith(".py") else None
