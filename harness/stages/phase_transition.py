"""`phase_transition`: when, during EM training, does misalignment set in?

Upstream: role `em`, a finetune_lora stage saved with `checkpoint_every` (its
`checkpoints/step-N/` and final `adapter/`), and optionally role `persona`, the frozen
adapter that one was trained on top of, active under every checkpoint. Step 0 is the
model without the EM adapter (its B matrices start at zero, so that is where it starts).

Per checkpoint: the EM rate (`harness.em`: sampled answers, every one judged) and the
geometry of the LoRA B matrices, all flattened into one vector b_t: its norm, its cosine
to the final b, and the local cosine cos(b_t - b_prev, b_next - b_t), which drops where
training turns.

The transition step is the checkpoint that ends the largest rise of the EM rate between
consecutive checkpoints. Its uncertainty comes from a bootstrap over answers: within
every checkpoint the judged answers are resampled, the curve and its transition step are
recomputed, `n_bootstrap` times; the interval holds the middle 95% of those steps. The
geometric transition (the lowest local cosine) is reported beside it.

Artifacts: phase_transition.json (per step: EM rate with CI, coherent rate, B norm,
cosines), answers.jsonl, samples.json (`transition_step`: the bootstrap steps; `step_N`:
the misaligned indicators per checkpoint), phase_transition.png.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from harness.checks import base_code_version, em_params
from harness.llm import TRANSPORT_KEYS
from harness.plots import figure as new_figure
from harness.spec.validate import SPECS_DIR, with_defaults
from harness.stage import StageContext, StageError, StageKind

VERSION = "1"
SCHEMA = SPECS_DIR / "stages" / "phase_transition.schema.json"
METRICS = ("transition_step", "geometry_transition_step", "final_em_rate", "largest_rise",
           "n_checkpoints")
STEP_DIR = re.compile(r"^step-(\d+)$")


# --- checkpoints and their geometry --------------------------------------------------


def checkpoints(stage_dir: Path) -> list[tuple[int, Path]]:
    """(step, adapter directory) of every checkpoint and of the final adapter, by step."""
    found = []
    root = stage_dir / "checkpoints"
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        match = STEP_DIR.match(path.name)
        if match and (path / "adapter_config.json").is_file():
            found.append((int(match.group(1)), path))
    if not found:
        raise StageError(
            f"{stage_dir} has no checkpoints/step-N/ adapters: train the EM stage with `checkpoint_every`"
        )
    found.sort()
    final = stage_dir / "adapter"
    if (final / "adapter_config.json").is_file():
        metadata = stage_dir / "train_metadata.json"
        last = json.loads(metadata.read_text())["n_steps"] if metadata.is_file() else found[-1][0] + 1
        if last > found[-1][0]:
            found.append((int(last), final))
    return found


def b_vector(adapter: Path) -> np.ndarray:
    from safetensors.numpy import load_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    keys = sorted(k for k in tensors if "lora_B" in k)
    if not keys:
        raise StageError(f"{adapter}: no lora_B weights in adapter_model.safetensors")
    return np.concatenate([tensors[k].astype(np.float64).ravel() for k in keys])


def _cosine(a: np.ndarray, b: np.ndarray) -> float | None:
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / norm) if norm > 0 else None


def geometry(vectors: Sequence[np.ndarray]) -> list[dict[str, float | None]]:
    """Per vector: norm, cosine to the last, local cosine of the steps before and after."""
    rows = []
    for i, b in enumerate(vectors):
        local = None
        if 0 < i < len(vectors) - 1:
            local = _cosine(b - vectors[i - 1], vectors[i + 1] - b)
        rows.append({"b_norm": float(np.linalg.norm(b)), "cos_to_final": _cosine(b, vectors[-1]),
                     "local_cos": local})
    return rows


# --- the transition ------------------------------------------------------------------


def transition(steps: Sequence[int], rates: Sequence[float]) -> tuple[int, float]:
    """The step ending the largest rise between consecutive checkpoints, and that rise."""
    rises = np.diff(np.asarray(rates, dtype=float))
    i = int(np.argmax(rises))
    return int(steps[i + 1]), float(rises[i])


def bootstrap_transitions(
    steps: Sequence[int], indicators: Sequence[Sequence[float]], n: int, seed: int
) -> list[int]:
    """The transition step of `n` curves, each from answers resampled within checkpoints."""
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(x, dtype=float) for x in indicators]
    out = []
    for _ in range(n):
        rates = [a[rng.integers(0, len(a), len(a))].mean() for a in arrays]
        out.append(transition(steps, rates)[0])
    return out


def _plot(rows: Sequence[Mapping[str, Any]], metrics: Mapping[str, Any], path: Path, title: str) -> None:
    steps = [r["step"] for r in rows]
    figure = new_figure(7, 4)
    axes = figure.add_subplot()
    rate = [r["em_rate"]["value"] for r in rows]
    low = [r["em_rate"]["value"] - r["em_rate"]["ci_low"] for r in rows]
    high = [r["em_rate"]["ci_high"] - r["em_rate"]["value"] for r in rows]
    axes.errorbar(steps, rate, yerr=[low, high], marker="o", color="tab:red", label="EM rate", capsize=3)
    t = metrics["transition_step"]
    axes.axvspan(t["ci_low"], t["ci_high"], color="tab:red", alpha=0.12, label="transition (95% bootstrap)")
    axes.set_xlabel("EM training step")
    axes.set_ylabel("EM rate")
    axes.set_ylim(0, 1)
    norms = axes.twinx()
    norms.plot(steps, [r["b_norm"] for r in rows], color="tab:blue", linestyle="--", label="|B|")
    norms.set_ylabel("norm of the LoRA B matrices")
    axes.legend(loc="upper left", fontsize=8)
    norms.legend(loc="upper right", fontsize=8)
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path)


def run(ctx: StageContext) -> dict[str, Any]:
    from harness.em import Measurement, misaligned_indicators
    from harness.models import load_tokenizer
    from harness.models.adapters import active, load_stacked
    from harness.store import write_json, write_jsonl
    from harness.upstream import adapter_dir, find_upstream

    p = with_defaults(ctx.params, SCHEMA)
    em_stage = find_upstream(ctx.upstream, "em", "phase_transition", only=False)
    persona = None
    if "persona" in ctx.upstream:
        persona = adapter_dir(ctx.upstream, "phase_transition", only=False, role="persona")
    found = checkpoints(em_stage.dir)
    measurement = Measurement.from_params(p, ctx.seed, ctx.log)
    adapters = {**({"persona": persona} if persona else {}), **{f"step_{s}": path for s, path in found}}
    model = load_stacked(p["base"], adapters)
    tokenizer = load_tokenizer(p["base"])
    under = ["persona"] if persona else []

    steps = [0] + [s for s, _ in found]
    vectors = [np.zeros_like(b_vector(found[0][1]))] + [b_vector(path) for _, path in found]
    shape = geometry(vectors)
    rows, answer_rows, indicators = [], [], []
    for step, geo in zip(steps, shape, strict=True):
        names = under + ([f"step_{step}"] if step else [])
        with active(model, names):
            judged, summary = measurement.run(model, tokenizer, f"step {step}")
        indicators.append(misaligned_indicators(judged))
        answer_rows += [{"step": step, **j.as_json()} for j in judged]
        rows.append({"step": step, "em_rate": summary["em_rate"], "coherent_rate": summary["coherent_rate"],
                     "n_scored": summary["n_scored"], **geo})
        ctx.log(f"step {step}: em_rate {summary['em_rate']['value']:.3f}, |B| {geo['b_norm']:.4f}")

    step, rise = transition(steps, [r["em_rate"]["value"] for r in rows])
    replicates = bootstrap_transitions(steps, indicators, p["n_bootstrap"], ctx.seed)
    low, high = np.percentile(replicates, [2.5, 97.5])
    local = [(r["local_cos"], r["step"]) for r in rows if r["local_cos"] is not None]
    metrics = {
        "transition_step": {"value": step, "ci_low": float(low), "ci_high": float(high)},
        "geometry_transition_step": min(local)[1] if local else None,
        "final_em_rate": rows[-1]["em_rate"]["value"],
        "largest_rise": rise,
        "n_checkpoints": len(found),
    }
    out = ctx.out_dir
    summary = {"em_stage": em_stage.name, "persona": str(persona) if persona else None}
    write_json(out / "phase_transition.json", {**summary, "steps": rows, "metrics": metrics})
    write_jsonl(out / "answers.jsonl", answer_rows)
    write_json(out / "samples.json", {"transition_step": [float(s) for s in replicates],
                                      **{f"step_{s}": x for s, x in zip(steps, indicators, strict=True)}})
    _plot(rows, metrics, out / "phase_transition.png", f"{ctx.stage}: EM rate and |B| over training")
    ctx.log(f"transition at step {step} (95% bootstrap [{low:g}, {high:g}]), rise {rise:+.3f}")
    return metrics


KIND = StageKind(
    name="phase_transition",
    run=run,
    params_schema=SCHEMA,
    metrics=METRICS,
    version=VERSION,
    input_params=("questions",),
    transport_params=tuple(f"judge.{key}" for key in TRANSPORT_KEYS),
    check=em_params,
    code_version=base_code_version(VERSION),
)
