"""The layering contract (.importlinter) holds, and fails on a planted violation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
pytestmark = pytest.mark.skipif(
    LINT is None, reason="import-linter is not installed (pip install -e '.[dev]')"
)


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}  # this copy of harness, not the installed one
    return subprocess.run(
        [LINT, str(root / ".importlinter"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def copy(tmp_path):
    shutil.copytree(ROOT / "harness", tmp_path / "harness", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    return tmp_path


def test_the_layers_hold(copy):
    result = lint(copy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "planted", "broken"),
    [
        ("core/graph.py", "from harness.lab import stats", "harness.core.graph -> harness.lab.stats"),
        ("core/store.py", "import harness.stages.steer", "is not allowed to import harness.stages"),
        ("stages/patch.py", "from harness.stages import steer", "No stage kind imports another BROKEN"),
    ],
)
def test_a_planted_violation_breaks_the_contract(copy, module, planted, broken):
    path = copy / "harness" / module
    path.write_text(path.read_text() + f"\n\ndef _planted():\n    {planted}\n")  # inside a function too
    result = lint(copy)
    assert result.returncode != 0
    assert broken in result.stdout, result.stdout
