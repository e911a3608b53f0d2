"""A declarative, spec-driven pytest harness for fine-tuning experiments."""

from harness.stage import ParamError, StageContext, StageError, StageKind, Upstream

__all__ = ["ParamError", "StageContext", "StageError", "StageKind", "Upstream"]
