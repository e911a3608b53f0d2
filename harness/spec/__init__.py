"""Spec files: YAML with line marks, includes, profiles, schema validation."""

from harness.spec.errors import Mark, Problem, SpecError
from harness.spec.yamlload import Document

__all__ = ["Document", "Mark", "Problem", "SpecError"]
