"""The docs cannot drift: the stage-kind pages are what the schemas generate, each kind's
documented metrics are the ones it declares, the README's spec loads, and links resolve."""

from __future__ import annotations

import itertools
import json
import re
import shutil
from pathlib import Path

import pytest

from harness import docs_pages
from harness.core import registry
from harness.core.experiment import load_experiment

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_the_stage_kind_pages_are_current():
    assert docs_pages.stale() == [], "run `python -m harness.docs_pages` and commit the pages"


def test_check_names_a_page_whose_schema_changed_and_a_page_without_a_schema(tmp_path, monkeypatch):
    schemas = tmp_path / "stages"
    shutil.copytree(docs_pages.STAGE_SCHEMAS, schemas)
    monkeypatch.setattr(docs_pages, "STAGE_SCHEMAS", schemas)
    pages = tmp_path / "pages"
    docs_pages.write(pages)
    assert docs_pages.stale(pages) == []

    schema = json.loads((schemas / "patch.schema.json").read_text())
    schema["properties"]["positions"]["description"] = "Prompt positions patched."
    (schemas / "patch.schema.json").write_text(json.dumps(schema))
    (pages / "retired_kind.md").write_text("# `retired_kind`\n")

    assert docs_pages.stale(pages) == ["patch.md", "retired_kind.md"]
    docs_pages.write(pages)
    assert "| `positions` | integer | `3` | Prompt positions patched. |" in (pages / "patch.md").read_text()
    assert not (pages / "retired_kind.md").exists()


def _expand(name: str) -> list[str]:
    """`{base,lora}_flip_layer` -> base_flip_layer, lora_flip_layer."""
    parts = re.split(r"\{([^}]*)\}", name)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(combo) for combo in itertools.product(*choices)]


@pytest.mark.parametrize("kind", sorted(docs_pages.kind_schemas()))
def test_a_kind_documents_exactly_the_metrics_it_declares(kind):
    declared = registry.get(kind).metrics
    if callable(declared):  # per setting, or named by the spec: the text says how
        pytest.skip(f"{kind}'s metrics depend on its params")
    text = docs_pages.kind_schemas()[kind]["x-metrics"]
    documented = {m for name in re.findall(r"`([^`]+)`", text) for m in _expand(name)}
    assert documented == set(declared)


def test_the_readme_spec_loads(tmp_path):
    block = re.search(r"```yaml\n(.*?)```", README.read_text(), re.S).group(1)
    shutil.copytree(ROOT / "experiments" / "steps", tmp_path / "steps")
    (tmp_path / "readme.yaml").write_text(block)
    experiment = load_experiment(tmp_path / "readme.yaml")
    assert list(experiment.stages) == ["data", "probe"]
    assert [g.text for g in experiment.stages["probe"].gates] == [
        "ci_low(auc) > 0.7",
        "auc_minus_dummy > 0.2 (abort < 0.1)",
    ]


def test_the_readme_shows_what_ci_runs():
    """.ci/run installs and tests exactly as the README says."""
    commands = [line.split("#")[0].strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    install = [c.removeprefix("python -m ").replace(" --quiet", "") for c in commands if "pip install" in c]
    tests = [c for c in commands if c.startswith("pytest")]
    assert install == ["pip install torch==2.13.0", "pip install -e '.[dev]'"]
    # the README's test command first; what follows it are CI's slower checks
    assert tests[0] == "pytest -n 2 --dist loadgroup --profile tiny"
    readme = README.read_text()
    for command in [*install, tests[0]]:
        assert f"    {command}" in readme, command


@pytest.mark.parametrize(
    "page", [README, *sorted((ROOT / "docs").rglob("*.md"))], ids=lambda p: str(p.relative_to(ROOT))
)
def test_every_relative_link_resolves(page):
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" not in target:
            assert (page.parent / target).exists(), f"{page.name} links to {target}"
