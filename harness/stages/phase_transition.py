"""`phase_transition`: when, during EM training, does misalignment set in?

Upstream: one or more EM training runs, each a finetune_lora stage saved with
`checkpoint_every` (its `checkpoints/step-N/` and final `adapter/`), the same recipe under
different seeds: the roles `runs` names (default: every upstream role but `persona`, e.g.
`needs: {em: em_goodness, em_s2: em_goodness_s2, em_s3: em_goodness_s3, persona: ...}`);
and optionally role `persona`, the frozen adapter they were trained on top of, active under
every checkpoint. Step 0 is the model without an EM adapter (B matrices start at zero, so
that is where every run starts), measured once and shared by the runs' curves.

Per checkpoint: the EM rate (`harness.lab.em`: sampled answers, every one judged) and the
geometry of the LoRA B matrices, all flattened into one vector b_t: its norm, its cosine
to the final b, and the local cosine cos(b_t - b_prev, b_next - b_t), which drops where
training turns.

Per run, the transition step is the checkpoint that ends the largest rise of the EM rate
between consecutive checkpoints; a bootstrap over that run's answers (resampled within
every checkpoint, `n_bootstrap` times) gives the middle 95% of the steps it could have
read, which says how sharp the run's rise is, not how runs vary. The geometric transition
(the lowest local cosine) is reported beside it. The metrics are means over the runs.

Training runs are the unit of replication: a claim that the transition moves between
personas compares runs' transition steps, one value per run (samples.json), never
answers resampled within one run.

Artifacts: phase_transition.json (per run and step: EM rate with CI, coherent rate, B
norm, cosines; per run its transition with its bootstrap interval), answers.jsonl,
samples.json (harness.core.samples: `transition_step`, one value per run, level "training
run"; `step_N`, the misaligned indicators of every run at checkpoint N, their unit the
run; `step_0`, the shared model without EM adapter, its answers the units),
phase_transition.png.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.api import stage_kind
from harness.core.samples import SampleSet
from harness.core.stage import Role, StageContext, StageError
from harness.core.upstream import adapter_role
from harness.lab.checks import em_params
from harness.lab.llm import transport_of
from harness.lab.plots import figure as new_figure

METRICS = (
    "transition_step",
    "geometry_transition_step",
    "final_em_rate",
    "largest_rise",
    "n_checkpoints",
    "n_runs",
)
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
        rows.append(
            {"b_norm": float(np.linalg.norm(b)), "cos_to_final": _cosine(b, vectors[-1]), "local_cos": local}
        )
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


@dataclass(frozen=True)
class RunCurve:
    """One training run measured at its checkpoints."""

    name: str  # the run's stage
    steps: list[int]  # 0 first
    indicators: list[list[float]]  # per step: misaligned 1.0 / 0.0 per scored answer
    rows: list[dict[str, Any]]  # per step: EM rate with CI, coherent rate, geometry

    def transition(self, n_bootstrap: int, seed: int) -> dict[str, Any]:
        step, rise = transition(self.steps, [r["em_rate"]["value"] for r in self.rows])
        resampled = bootstrap_transitions(self.steps, self.indicators, n_bootstrap, seed)
        low, high = np.percentile(resampled, [2.5, 97.5])
        local = [(r["local_cos"], r["step"]) for r in self.rows if r["local_cos"] is not None]
        return {
            "run": self.name,
            "transition_step": step,
            "bootstrap_low": float(low),
            "bootstrap_high": float(high),
            "largest_rise": rise,
            "geometry_transition_step": min(local)[1] if local else None,
            "final_em_rate": self.rows[-1]["em_rate"]["value"],
        }


def run_samples(curves: Sequence[RunCurve], transitions: Sequence[Mapping[str, Any]]) -> dict[str, SampleSet]:
    """The sets hypotheses read: the runs' transition steps, one unit each, and per checkpoint
    step the runs' misaligned indicators, their unit the run (step 0, one shared model: its answers)."""
    sets = {
        "transition_step": SampleSet(
            tuple(float(t["transition_step"]) for t in transitions),
            tuple(c.name for c in curves),
            "training run",
        )
    }
    shared = curves[0].indicators[0]
    sets["step_0"] = SampleSet.independent(shared, "answer")
    for step in sorted({s for c in curves for s in c.steps[1:]}):
        values, units = [], []
        for c in curves:
            if step in c.steps:
                values += c.indicators[c.steps.index(step)]
                units += [c.name] * len(c.indicators[c.steps.index(step)])
        sets[f"step_{step}"] = SampleSet(tuple(values), tuple(units), "training run")
    return sets


def _plot(
    curves: Sequence[RunCurve], transitions: Sequence[Mapping[str, Any]], path: Path, title: str
) -> None:
    figure = new_figure(7, 4)
    axes = figure.add_subplot()
    norms = axes.twinx()
    for i, (curve, t) in enumerate(zip(curves, transitions, strict=True)):
        color = f"C{i}"
        rate = [r["em_rate"]["value"] for r in curve.rows]
        axes.plot(curve.steps, rate, marker="o", color=color, label=f"{curve.name}: EM rate")
        axes.axvline(t["transition_step"], color=color, alpha=0.4, linestyle=":")
        norms.plot(curve.steps, [r["b_norm"] for r in curve.rows], color=color, linestyle="--", alpha=0.5)
    axes.set_xlabel("EM training step (dotted: each run's transition; dashed: |B|)")
    axes.set_ylabel("EM rate")
    axes.set_ylim(0, 1)
    norms.set_ylabel("norm of the LoRA B matrices")
    axes.legend(loc="upper left", fontsize=8)
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path)


def _run_roles(ctx: StageContext, runs: Sequence[str] | None) -> list[str]:
    roles = list(runs) if runs else [r for r in ctx.upstream if r != "persona"]
    missing = [r for r in roles if r not in ctx.upstream]
    if not roles or missing:
        have = ", ".join(ctx.upstream) or "none"
        raise StageError(
            f"phase_transition needs the EM training runs as upstream roles (`runs`: "
            f"{', '.join(roles) or 'none'}; upstream roles: {have}): add them to `needs`, e.g. "
            "needs: {em: <finetune stage>, em_s2: <the same under another seed>}"
        )
    return roles


@dataclass(frozen=True)
class Runs:
    """The EM training runs' checkpoints, the persona adapter under them, and the measurement."""

    checkpoints: dict[str, list[tuple[int, Path]]]  # per run's role: (step, adapter directory)
    persona: Path | None
    measurement: Any  # harness.lab.em.Measurement


@dataclass(frozen=True)
class CheckpointedModel:
    """The base model with the persona adapter, if any, and every run's checkpoints loaded."""

    model: Any
    tokenizer: Any
    with_persona: bool  # every measurement on top of the persona adapter

    def measure(
        self, measurement: Any, label: str, checkpoint: str | None
    ) -> tuple[list[Any], dict[str, Any]]:
        """Judged answers and their summary, `checkpoint` (None: no EM adapter) on the persona's."""
        from harness.lab.models.adapters import active

        adapters = [*(["persona"] if self.with_persona else []), *([checkpoint] if checkpoint else [])]
        with active(self.model, adapters):
            return measurement.run(self.model, self.tokenizer, label)


def load_runs(ctx: StageContext) -> Runs:
    from harness.core.upstream import adapter_dir
    from harness.lab.em import Measurement

    roles = _run_roles(ctx, ctx.params.get("runs"))
    persona = None
    if "persona" in ctx.upstream:
        persona = adapter_dir(ctx.upstream, "phase_transition", only=False, role="persona")
    found = {role: checkpoints(ctx.upstream[role].dir) for role in roles}
    return Runs(found, persona, Measurement.from_params(ctx.params, ctx.seed, ctx.log))


def load_checkpointed_model(base: str, runs: Runs) -> CheckpointedModel:
    from harness.lab.models import load_tokenizer
    from harness.lab.models.adapters import load_stacked

    adapters = {
        **({"persona": runs.persona} if runs.persona else {}),
        **{f"{role}@{s}": path for role, ck in runs.checkpoints.items() for s, path in ck},
    }
    return CheckpointedModel(load_stacked(base, adapters), load_tokenizer(base), runs.persona is not None)


def measure_run(
    ctx: StageContext,
    runs: Runs,
    model: CheckpointedModel,
    role: str,
    start: tuple[list[Any], dict[str, Any]],
) -> tuple[RunCurve, list[dict[str, Any]]]:
    """One run's curve over its checkpoints, step 0 being `start`, and its answers past step 0."""
    from harness.lab.em import misaligned_indicators

    name, ck = ctx.upstream[role].name, runs.checkpoints[role]
    steps = [0] + [s for s, _ in ck]
    vectors = [np.zeros_like(b_vector(ck[0][1]))] + [b_vector(path) for _, path in ck]
    indicators, rows, answer_rows = [], [], []
    for step, geo in zip(steps, geometry(vectors), strict=True):
        if step:
            judged, summary = model.measure(runs.measurement, f"{name} step {step}", f"{role}@{step}")
            answer_rows += [{"run": name, "step": step, **j.as_json()} for j in judged]
        else:
            judged, summary = start
        indicators.append(misaligned_indicators(judged))
        rows.append(
            {
                "step": step,
                "em_rate": summary["em_rate"],
                "coherent_rate": summary["coherent_rate"],
                "n_scored": summary["n_scored"],
                **geo,
            }
        )
        ctx.log(f"{name} step {step}: em_rate {summary['em_rate']['value']:.3f}, |B| {geo['b_norm']:.4f}")
    return RunCurve(name, steps, indicators, rows), answer_rows


def measure_curves(
    ctx: StageContext, runs: Runs, model: CheckpointedModel
) -> tuple[list[RunCurve], list[dict[str, Any]]]:
    """Every run's curve, and every answer: step 0's once, then each run's."""
    # step 0: no EM adapter, the same model for every run
    start = model.measure(runs.measurement, "step 0", None)
    answer_rows = [{"run": None, "step": 0, **j.as_json()} for j in start[0]]
    curves = []
    for role in runs.checkpoints:
        curve, answers = measure_run(ctx, runs, model, role, start)
        curves.append(curve)
        answer_rows += answers
    return curves, answer_rows


def summarize(
    ctx: StageContext, runs: Runs, curves: Sequence[RunCurve]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each run's transition, and the metrics: means over the runs."""
    transitions = [c.transition(ctx.params["n_bootstrap"], ctx.seed) for c in curves]
    for t in transitions:
        ctx.log(
            f"{t['run']}: transition at step {t['transition_step']} (95% bootstrap over its answers "
            f"[{t['bootstrap_low']:g}, {t['bootstrap_high']:g}]), rise {t['largest_rise']:+.3f}"
        )
    geometric = [g for g in (t["geometry_transition_step"] for t in transitions) if g is not None]
    metrics = {
        "transition_step": float(np.mean([t["transition_step"] for t in transitions])),
        "geometry_transition_step": float(np.mean(geometric)) if geometric else None,
        "final_em_rate": float(np.mean([t["final_em_rate"] for t in transitions])),
        "largest_rise": float(np.mean([t["largest_rise"] for t in transitions])),
        "n_checkpoints": int(np.mean([len(ck) for ck in runs.checkpoints.values()])),
        "n_runs": len(curves),
    }
    return transitions, metrics


def write_artifacts(
    ctx: StageContext,
    runs: Runs,
    curves: Sequence[RunCurve],
    transitions: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, Any],
    answer_rows: Sequence[Mapping[str, Any]],
) -> None:
    from harness.core.samples import SAMPLES_FILE, write_samples
    from harness.core.store import relative_path, write_json, write_jsonl
    from harness.lab.em import sampling_parameters

    p, out = ctx.params, ctx.out_dir
    write_json(
        out / "phase_transition.json",
        {
            "runs": [{**t, "steps": c.rows} for c, t in zip(curves, transitions, strict=True)],
            "persona": relative_path(runs.persona, out) if runs.persona else None,
            "sampling": sampling_parameters(p["temperature"], p["max_new_tokens"]),
            "metrics": metrics,
        },
    )
    write_jsonl(out / "answers.jsonl", answer_rows)
    write_samples(out / SAMPLES_FILE, run_samples(curves, transitions))
    _plot(curves, transitions, out / "phase_transition.png", f"{ctx.stage}: EM rate and |B| over training")


@stage_kind(
    needs=lambda params: (
        *(
            Role(role, "the checkpoints/step-N/ of a finetune_lora stage", named_at=("runs", i))
            for i, role in enumerate(params.get("runs") or ())
        ),
        adapter_role("persona", only=False, optional=True),
    ),
    metrics=METRICS,
    input_params=("questions",),
    transport_params=transport_of("judge"),
    check=em_params,
)
def run(ctx: StageContext) -> dict[str, Any]:
    runs = load_runs(ctx)
    model = load_checkpointed_model(ctx.params["base"], runs)
    curves, answer_rows = measure_curves(ctx, runs, model)
    transitions, metrics = summarize(ctx, runs, curves)
    write_artifacts(ctx, runs, curves, transitions, metrics, answer_rows)
    return metrics
