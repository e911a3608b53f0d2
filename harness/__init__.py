"""A declarative, spec-driven pytest harness for fine-tuning experiments.

The stage contract's types are here; a stage kind's author finds all they need in
`harness.api` (docs/writing-a-stage-kind.md)."""

from harness.core.stage import ParamError, StageContext, StageError, StageKind, Upstream

__all__ = ["ParamError", "StageContext", "StageError", "StageKind", "Upstream"]
