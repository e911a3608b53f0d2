"""Shared wiring of the harness's own tests."""

# Stages seed torch and numpy. pytester's in-process runs restore sys.modules after
# each run, and a C extension imported a second time in one process crashes; imported
# here first, they survive every restore.
import numpy  # noqa: F401
import torch  # noqa: F401
