"""The engine: the stage contract, registry, experiment, graph, execution, gates and store.

It imports no research code (harness.lab, harness.stages): .importlinter checks it."""
