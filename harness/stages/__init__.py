"""Built-in stage kinds: module `x` defines the kind `x`, a run function decorated with
`@stage_kind(...)` (see harness.core.stage); it is imported when a spec uses it."""
