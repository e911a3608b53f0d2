"""Built-in stage kinds: each module defines `KIND = StageKind(...)` (see harness.stage)."""
