"""One layer naming in every metric and plot of the interpretability kinds: layer i is
hidden_states[i], 0 the embeddings and i the output of block i-1 (harness.lab.activations).
On the tiny world, the probe's best_layer metric, the layer its plot highlights, and the axes of
the probe, logit lens and patching plots name the same layers the same way."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from harness.core.upstream import Upstream
from harness.lab.activations import LAYER_AXIS, layer_tick
from harness.stages import extract_activations, logit_lens, patch, train_probe
from harness.testing import run_kind

DATA = Path(__file__).resolve().parents[1] / "data/eval/tiny_world"
N_INDICES = 5  # the tiny world: embeddings + 4 blocks


def tick_texts(labels) -> list[str]:
    return [label.get_text() for label in labels]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, tiny_model_dir, save_adapter) -> dict:
    root = tmp_path_factory.mktemp("layer-naming")
    base = str(tiny_model_dir)
    trained = save_adapter(base, root / "train", std=0.05)
    adapter = {"adapter": Upstream("train", "finetune_lora", trained, {})}
    contrast = {"base": base, "mcqs": str(DATA / "cubic_gravity_mcqs.jsonl"), "scoring": "continuation"}
    statements = {"base": base, "statements": str(DATA / "statements.jsonl"), "use_adapter": False}
    activations = run_kind(extract_activations.run, statements, root / "activations", spec_dir=root)
    probe = run_kind(
        train_probe.run,
        {"label": "true_world", "n_permutations": 2},
        root / "probe",
        upstream={"activations": activations.out_dir},
    )
    lens = run_kind(logit_lens.run, contrast, root / "lens", upstream=adapter, spec_dir=root)
    patched = run_kind(patch.run, contrast, root / "patch", upstream=adapter, spec_dir=root, stage="patch")
    return {"probe": probe, "lens": lens, "patch": patched, "root": root}


def test_probe_lens_and_patch_name_the_same_layers(tiny_runs, tmp_path):
    expected = [layer_tick(i) for i in range(N_INDICES)]
    assert expected[0] != expected[1] and "emb" in expected[0]

    probe = tiny_runs["probe"]
    report = json.loads((probe.out_dir / "probe_results.json").read_text())
    best = probe.metrics["best_layer"]
    axes = train_probe.plot_auc_by_layer(report, tmp_path / "probe.png", "probe").axes[0]
    assert tick_texts(axes.get_xticklabels()) == expected and axes.get_xlabel() == LAYER_AXIS
    highlighted = [line for line in axes.get_lines() if line.get_label().startswith("best_layer")]
    assert [line.get_xdata()[0] for line in highlighted] == [best]
    assert highlighted[0].get_label() == f"best_layer {layer_tick(best)}"
    assert dict(zip(axes.get_xticks(), expected, strict=True))[best] == layer_tick(best)

    summary = json.loads((tiny_runs["lens"].out_dir / "logit_lens_summary.json").read_text())
    assert summary["layers"] == expected
    axes = logit_lens.plot_mean(tmp_path / "mean.png", summary).axes[0]
    assert tick_texts(axes.get_xticklabels()) == expected and axes.get_xlabel() == LAYER_AXIS
    rows = [
        [json.loads(line) for line in (tiny_runs["lens"].out_dir / f"trajectories_{model}.jsonl").open()]
        for model in logit_lens.MODELS
    ]
    axes = logit_lens.plot_heatmap(tmp_path / "heat.png", *rows, summary["layers"]).axes[0]
    assert tick_texts(axes.get_yticklabels()) == expected and axes.get_ylabel() == LAYER_AXIS

    report = json.loads((tiny_runs["patch"].out_dir / "patching.json").read_text())
    recovery = {d: np.array(report[d]["recovered"], dtype=float) for d in patch.DIRECTIONS}  # None: NaN
    figure = patch.plot_recovery(recovery, tmp_path / "patch.png", "patch")
    assert figure.axes[0].get_ylabel() == LAYER_AXIS
    for axes in figure.axes[:-1]:  # the last is the colorbar
        assert tick_texts(axes.get_yticklabels()) == expected
