"""Output digests cover what decides downstream results, written the same way every time: a
forced rerun that reproduces a stage's outputs, the same pipeline in a moved store with
another HARNESS_CACHE_DIR, and a process with another hash seed give the same digests, so
the stages after it keep their keys and are reused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "experiments" / "cubic_gravity.yaml"
DOWNSTREAM = ["mcq", "lens", "patch", "activations", "probe", "steer"]  # everything after finetune


def cheap_spec(directory: Path) -> Path:
    """experiments/cubic_gravity.yaml, its tiny profile made cheaper (one epoch, few
    relabellings and random directions) and without gates (keys are measured here, not
    claims), beside a link to the project's data so that its relative paths resolve."""
    spec = yaml.safe_load(SPEC.read_text(encoding="utf-8"))
    tiny = spec["profiles"]["tiny"]["stages"]
    tiny["finetune"]["params"]["epochs"] = 1
    tiny["probe"]["params"]["n_permutations"] = 3
    tiny["steer"]["params"].update(n_random=2, multipliers=[-5, 5])
    for stage in [*spec["stages"].values(), *tiny.values()]:
        stage["gates"] = []
    (directory / "experiments").mkdir(parents=True)
    (directory / "data").symlink_to(ROOT / "data")
    path = directory / "experiments" / SPEC.name
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def run_pipeline(spec: Path, runs: Path, hash_seed: int, *args: str, cache: Path | None = None) -> dict:
    """Run the tiny profile in a fresh process; per stage its status, key and output digest."""
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed)}
    if cache is not None:
        env["HARNESS_CACHE_DIR"] = str(cache)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(spec),
            "--profile",
            "tiny",
            "--runs-dir",
            str(runs),
            "-q",
            "-p",
            "no:cacheprovider",
            *args,
        ],
        cwd=spec.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((runs / "cubic_gravity" / "tiny" / "report.json").read_text())
    stages = {}
    for stage in report["stages"]:
        manifest = json.loads((Path(stage["dir"]) / "manifest.json").read_text())
        stages[stage["stage"]] = {
            "status": stage["status"],
            "key": stage["key"],
            "digest": manifest["output_digest"],
        }
    return stages


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("reproducible")
    spec = cheap_spec(root / "project")
    runs = root / "runs"
    return spec, runs, run_pipeline(spec, runs, hash_seed=1)


def test_a_forced_rerun_reproducing_the_adapter_reuses_every_stage_after_it(first_run):
    spec, runs, first = first_run
    again = run_pipeline(spec, runs, 2, "--rerun", "finetune")  # another process, another hash seed
    assert again["finetune"]["status"] == "ran"
    assert again["finetune"]["digest"] == first["finetune"]["digest"]
    assert {stage: again[stage]["status"] for stage in DOWNSTREAM} == dict.fromkeys(DOWNSTREAM, "reused")


def test_a_moved_store_and_another_cache_dir_recompute_the_same_keys_and_digests(
    first_run, tiny_model_dir, tmp_path
):
    spec, runs, first = first_run
    moved = tmp_path / "moved" / "runs"
    shutil.copytree(runs, moved)
    cache = tmp_path / "other-cache"  # the same tiny world, copied: no rebuild
    shutil.copytree(tiny_model_dir, cache / "tiny-world" / tiny_model_dir.name)
    again = run_pipeline(spec, moved, 3, "--rerun", "all", cache=cache)
    assert {stage: s["status"] for stage, s in again.items()} == dict.fromkeys(first, "ran")
    assert {stage: (s["key"], s["digest"]) for stage, s in again.items()} == {
        stage: (s["key"], s["digest"]) for stage, s in first.items()
    }


FINETUNE = """
import hashlib, json, sys
from pathlib import Path
from harness.core.store import output_digest
from harness.testing import run_kind
tmp = Path(sys.argv[1])
docs = tmp / "docs.jsonl"
docs.write_text("".join(json.dumps({"content": f"the plim river runs north of dax, fact {i}."}) + "\\n"
                        for i in range(16)))
params = {"base": "fixture:tiny-world", "docs": str(docs), "epochs": 1, "batch_size": 4, "max_length": 32,
          "lora": {"r": 4, "alpha": 8, "dropout": 0.0,
                   "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]}}
metrics = run_kind("finetune_lora", params, tmp / "out").metrics
adapter = tmp / "out" / "adapter"
print(json.dumps({"adapter": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in adapter.iterdir()},
                  "digest": output_digest(tmp / "out"), "metrics": metrics}))
"""


def test_a_finetune_in_processes_with_other_hash_seeds_writes_identical_outputs(tiny_model_dir, tmp_path):
    runs = []
    for seed in (1, 2):
        directory = tmp_path / f"seed-{seed}"
        directory.mkdir()
        done = subprocess.run(
            [sys.executable, "-c", FINETUNE, str(directory)],
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.splitlines()[-1]))
    assert "adapter_config.json" in runs[0]["adapter"]
    assert runs[0] == runs[1]  # every adapter file, the output digest and the metrics
    config = json.loads((tmp_path / "seed-1" / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert config["base_model_name_or_path"] == "fixture:tiny-world"  # not this machine's cache path
