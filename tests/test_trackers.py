"""Export to trackers (`--track`, ini harness_trackers): W&B in offline mode and MLflow on a
local file store, each checked in what it wrote. Off by default."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

wandb = pytest.importorskip("wandb")
mlflow = pytest.importorskip("mlflow")

STEPS = """
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

def step(ctx):
    fig, ax = plt.subplots()
    ax.plot([0.9, 0.5, 0.2])
    fig.savefig(ctx.out_dir / "curve.png")
    plt.close(fig)
    v = ctx.params["args"]["value"]
    return {"value": v, "score": {"value": v, "ci_low": v - 0.5, "ci_high": v + 0.5},
            "curve": [0.9, 0.5, 0.2], "note": "words are not tracked"}
"""

SPEC = {
    "experiment": "exp",
    "seed": 1,
    "stages": {
        "train": {
            "kind": "python",
            "params": {
                "function": "steps:step",
                "metrics": ["value", "score", "curve", "note"],
                "args": {"value": 3, "lr": 0.01},
            },
            "gates": ["value > 2", "ci_low(score) > 3"],
        }
    },
    "profiles": {"tiny": {"stages": {}}},
}


@pytest.fixture
def world(pytester: pytest.Pytester, monkeypatch, tmp_path) -> pytest.Pytester:
    pytester.makepyfile(steps=STEPS)
    pytester.makefile(".yaml", exp=json.dumps(SPEC))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-dir").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind this
    return pytester


def wandb_records(tmp_path: Path) -> dict[str, list]:
    """The records of the one offline W&B run, by type: its .wandb file is a LevelDB-format log
    (7-byte header; 32 KiB blocks of chunks: checksum, length, type) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    (log,) = (tmp_path / "wandb-dir" / "wandb").glob("offline-run-*/run-*.wandb")
    data, pos, chunks, out = log.read_bytes(), 7, b"", {}
    block = 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            out.setdefault(record.WhichOneof("record_type"), []).append(record)
            chunks = b""
    return out


def test_run_exported_to_wandb_offline_and_mlflow_file_store(world, tmp_path):
    result = world.runpytest("exp.yaml", "--profile", "tiny", "--track", "wandb", "--track", "mlflow")
    result.assert_outcomes(failed=1)  # a failed gate: still exported, gates passed 1 of 2
    result.stdout.fnmatch_lines(
        [
            "*harness trackers*",
            "exp ?tiny? -> wandb: *wandb-dir/wandb/offline-run-*",
            "exp ?tiny? -> mlflow: file:*/mlruns run *",
        ]
    )

    records = wandb_records(tmp_path)
    (run,) = [r.run for r in records["run"]]
    assert (run.project, run.display_name) == ("exp", "tiny")
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["train"]["args"] == {"value": 3, "lr": 0.01}
    summary = {
        "/".join(u.nested_key) or u.key: json.loads(u.value_json)
        for r in records["summary"]
        for u in r.summary.update
    }
    assert summary["train/value"] == 3
    assert (summary["train/score.ci_low"], summary["train/score.ci_high"]) == (2.5, 3.5)
    assert (summary["harness/gates_passed"], summary["harness/gates"]) == (1, 2)
    assert "train/note" not in summary
    history = [
        {"/".join(i.nested_key) or i.key: i.value_json for i in r.history.item} for r in records["history"]
    ]
    assert [json.loads(h["train/curve"]) for h in history if "train/curve" in h] == [0.9, 0.5, 0.2]
    assert any(h.get("train/curve.png/_type") == '"image-file"' for h in history)  # the plot, as an image
    assert list(
        (tmp_path / "wandb-dir" / "wandb").glob("offline-run-*/files/media/images/train/curve.png_*.png")
    )

    client = mlflow.MlflowClient()
    (logged,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert logged.info.run_name == "tiny"
    assert logged.data.params["train.args.value"] == "3"
    assert logged.data.params["train.args.lr"] == "0.01"
    assert logged.data.metrics["train/score.ci_low"] == 2.5
    assert logged.data.metrics["harness/gates_passed"] == 1
    assert logged.data.tags["profile"] == "tiny"
    assert logged.data.tags["outcome.failed"] == "1"
    curve = client.get_metric_history(logged.info.run_id, "train/curve")
    assert [(m.step, m.value) for m in curve] == [(0, 0.9), (1, 0.5), (2, 0.2)]
    assert [a.path for a in client.list_artifacts(logged.info.run_id, "train")] == ["train/curve.png"]


def test_trackers_are_off_by_default_and_the_ini_turns_one_on(world, tmp_path):
    world.runpytest("exp.yaml").assert_outcomes(passed=0, failed=1)
    assert not (tmp_path / "wandb-dir" / "wandb").exists() and not (tmp_path / "mlruns").exists()

    world.makeini("[pytest]\nharness_trackers = mlflow\n")
    result = world.runpytest("exp.yaml")
    result.stdout.fnmatch_lines(["exp ?default? -> mlflow: *"])
    client = mlflow.MlflowClient()
    (logged,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert (logged.info.run_name, logged.data.metrics["train/value"]) == ("default", 3)
    assert not (tmp_path / "wandb-dir" / "wandb").exists()


def test_an_unknown_tracker_is_a_usage_error(world):
    result = world.runpytest("exp.yaml", "--track", "tensorboard")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown tracker tensorboard: choose from wandb, mlflow*"])
