"""Pre-registered hypotheses: the plan in the spec, its lock, and their evaluation."""
