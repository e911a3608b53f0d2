"""The hooks the harness plugin adds to pytest (declared through `pytest_addhooks`)."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from harness.core.stage import StageKind


@pytest.hookspec(historic=True)
def pytest_harness_stage_kinds() -> Iterable[StageKind]:
    """Return stage kinds to register for this session: a conftest.py adds kinds without a
    package or an entry point. Called at configure, and for a conftest.py or plugin loaded
    later, when it is."""
