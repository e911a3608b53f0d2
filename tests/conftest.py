"""Shared wiring of the harness's own tests."""

# Stages seed torch and numpy. pytester's in-process runs restore sys.modules after
# each run, and a C extension imported a second time in one process crashes; imported
# here first, they survive every restore.
import numpy  # noqa: F401
import pytest
import torch  # noqa: F401

from fixtures.llm_server import llm_server_fixture  # noqa: F401  (the `llm_server` fixture)


@pytest.fixture(scope="session")
def tiny_model_dir():
    """The tiny world's model and tokenizer (built once, cached across runs): a directory
    usable as a spec's `base:`."""
    from fixtures import tiny_world

    return tiny_world.build()
