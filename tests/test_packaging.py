"""What `pip install` puts on the import path: `harness` alone. The tiny worlds and the test
servers live in the top-level fixtures/ folder and are installed as `harness.fixtures`, since
the name `fixtures` belongs to an unrelated PyPI package. Reinstall (`pip install -e .`) after
changing the packages in pyproject.toml: these tests read the installed distribution."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FIND = """
import importlib.util, json
spec = importlib.util.find_spec("fixtures")
print(json.dumps({"fixtures": spec and spec.origin,
                  "tiny_world": importlib.util.find_spec("harness.fixtures.tiny_world").origin}))
"""


def test_the_distribution_installs_harness_and_no_top_level_fixtures():
    assert "harness" in packages_distributions()["harness"]
    assert "harness" not in packages_distributions().get("fixtures", [])


def test_outside_the_checkout_the_tiny_worlds_import_as_harness_fixtures_only(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", FIND], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["tiny_world"] == str(ROOT / "fixtures" / "tiny_world.py")
    # None, or PyPI's `fixtures` when it is installed: never this project's folder
    assert found["fixtures"] is None or not Path(found["fixtures"]).is_relative_to(ROOT)


def test_pyproject_lists_every_package_of_harness():
    """setuptools cannot rename a discovered package, so the packages are listed by hand: a new
    subpackage of harness/ must be added there, or a wheel install would lack it."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "harness").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert set(setuptools["packages"]) == on_disk | {"harness.fixtures"}
    assert setuptools["package-dir"] == {"harness.fixtures": "fixtures"}
