"""JSON Schema (draft 2020-12) validation whose errors point at spec lines."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import jsonschema
from jsonschema.exceptions import ValidationError, best_match
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource

from harness.spec.errors import Problem, did_you_mean
from harness.spec.yamlload import Document, SpecPath

SPECS_DIR = Path(__file__).resolve().parents[2] / "specs"
EXPERIMENT_SCHEMA = SPECS_DIR / "experiment.schema.json"
MAX_PROBLEMS = 10


@cache
def load_schema(path: Path) -> dict[str, Any]:
    # cached by the path as given: resolving costs system calls, and every stage of every
    # profile asks for its kind's schema
    path = path.resolve()
    schema = json.loads(path.read_text(encoding="utf-8"))
    # its own file URI as base, so `"$ref": "provider.schema.json"` finds a sibling fragment
    schema.setdefault("$id", path.as_uri())
    return schema


def _retrieve(uri: str) -> Resource:
    if not uri.startswith("file://"):
        raise NoSuchResource(uri)
    return Resource.from_contents(load_schema(Path(url2pathname(urlparse(uri).path))))


_REGISTRY: Registry = Registry(retrieve=_retrieve)


def with_defaults(value: Any, schema: Mapping[str, Any] | Path) -> Any:
    """`value` with the schema's `default`s filled in, recursively through `properties`:
    a kind's schema is the one place its defaults are written. The experiment fills them
    when it is loaded, so cache keys, manifests and runs all see the params a stage uses."""
    if isinstance(schema, Path):
        schema = load_schema(schema)
    if not isinstance(value, dict):
        return value
    out = dict(value)
    for name, sub in schema.get("properties", {}).items():
        if name not in out and "default" in sub:
            out[name] = copy.deepcopy(sub["default"])
        if name in out:
            out[name] = with_defaults(out[name], sub)
    return out


@cache
def _validator_for_file(path: Path) -> jsonschema.Draft202012Validator:
    return _validator(load_schema(path))


def _validator(schema: Mapping[str, Any]) -> jsonschema.Draft202012Validator:
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=_REGISTRY)


_inline_validators: dict[int, tuple[Mapping, jsonschema.Draft202012Validator]] = {}


def validator_for(schema: Mapping[str, Any] | Path) -> jsonschema.Draft202012Validator:
    if isinstance(schema, Path):
        return _validator_for_file(schema)
    cached = _inline_validators.get(id(schema))
    if cached is None or cached[0] is not schema:
        cached = _inline_validators[id(schema)] = (schema, _validator(schema))
    return cached[1]


def is_name(text: str) -> bool:
    """Whether `text` follows the schema's rule for names (of stages, profiles, experiments)."""
    return validator_for(load_schema(EXPERIMENT_SCHEMA)["$defs"]["name"]).is_valid(text)


def dotted(path: SpecPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def check(
    instance: Any,
    schema: Mapping[str, Any] | Path,
    doc: Document,
    prefix: SpecPath = (),
) -> list[Problem]:
    """Problems of `instance` (found at `prefix` in `doc`) against `schema`, by line."""
    errors = sorted(
        validator_for(schema).iter_errors(instance),
        key=lambda e: [str(p) for p in e.absolute_path],
    )
    problems: list[Problem] = []
    for error in errors:
        problems.extend(_problems(error, doc, prefix))
    problems.sort(key=lambda p: (p.mark.line, p.mark.column) if p.mark else (0, 0))
    return problems[:MAX_PROBLEMS]


def invalid_paths(instance: Any, schema: Mapping[str, Any] | Path) -> set[SpecPath]:
    """Where `instance` breaks `schema` other than by an unknown key: the values that later
    checks cannot read. A mapping with an unknown key (reported where it is written) is
    otherwise whole, so what it holds can still be checked."""
    paths = set()
    for error in validator_for(schema).iter_errors(instance):
        if not _unknown_keys(error):
            path = tuple(error.absolute_path)
            paths.add(path + (error.instance,) if "propertyNames" in error.absolute_schema_path else path)
    return paths


def _problems(error: ValidationError, doc: Document, prefix: SpecPath) -> list[Problem]:
    if error.context and error.validator in ("oneOf", "anyOf"):
        # leave out the branches whose own type did not match: the rest says what is wrong
        wrong_type = {
            e.relative_schema_path[0] for e in error.context if list(e.relative_schema_path)[1:] == ["type"]
        }
        matching = [e for e in error.context if e.relative_schema_path[0] not in wrong_type]
        error = best_match(matching or error.context)
    path = prefix + tuple(error.absolute_path)
    if "propertyNames" in error.absolute_schema_path:  # the bad name itself, not its parent
        path += (error.instance,)
    unknown = _unknown_keys(error)
    if unknown:
        allowed = list(error.schema.get("properties", {}))
        out = []
        for key in unknown:
            extra = did_you_mean(str(key), allowed) or (f"; allowed: {', '.join(allowed)}" if allowed else "")
            out.append(Problem(f"unknown key {key!r}{extra}", doc.mark(path + (key,)), dotted(path)))
        return out
    message = _short(error.message)
    if error.validator == "enum" and isinstance(error.instance, str):
        message += did_you_mean(error.instance, [v for v in error.validator_value if isinstance(v, str)])
    if error.validator in ("maxProperties", "maxItems"):  # not the whole oversized value
        message = f"at most {error.validator_value} allowed, found {len(error.instance)}"
    return [Problem(message, doc.mark(path), dotted(path) or "(top level)")]


def _unknown_keys(error: ValidationError) -> list[Any]:
    """The keys that an `additionalProperties: false` error refuses, if it is one."""
    if error.validator != "additionalProperties" or not isinstance(error.instance, dict):
        return []
    allowed = error.schema.get("properties", {})
    patterns = list(error.schema.get("patternProperties", {}))
    return [k for k in error.instance if k not in allowed and not any(re.search(p, str(k)) for p in patterns)]


def _short(message: str, limit: int = 240) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."
