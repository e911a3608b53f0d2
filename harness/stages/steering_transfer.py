"""`steering_transfer`: is the EM direction one direction, or one per persona?

Upstream: role `answers`, an em_eval stage (its answers.jsonl, judged), and the adapter
roles that `settings` names, as in em_eval. For every setting S (a persona with its EM
adapter, say) the EM vector v_S is the mean residual stream at `layer`, over the answer
tokens, of S's misaligned answers minus that of its aligned answers, read with S's own
adapters active. Then:

- cosines: cos(v_A, v_B) for every pair of settings;
- transfer: S's model answers the questions again with v_A * `multiplier` added at
  `layer` (every position), for every A, and with a random direction of the same norm
  as v_A * multiplier (the control); each EM rate is set against S unsteered.

A vector that moves its own setting but not the others, or the others as well, is what
"steering vectors transfer differently across personas" asks about.

Artifacts: vectors.safetensors (`<setting>`: v_S), steering_transfer.json (norms,
cosines, EM rates per (vector, target) with CIs, the random controls, counts),
samples.json (`<A>-><B>`, `random(<A>)-><B>` and `<B>`: misaligned indicators) and
transfer.png (the EM-rate change matrix).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from harness.checks import base_code_version, em_params
from harness.llm import TRANSPORT_KEYS
from harness.plots import figure as new_figure
from harness.spec.validate import SPECS_DIR, with_defaults
from harness.stage import StageContext, StageError, StageKind

VERSION = "1"
SCHEMA = SPECS_DIR / "stages" / "steering_transfer.schema.json"
METRICS = ("mean_cosine", "self_effect", "cross_effect", "random_effect", "self_minus_cross", "layer")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / norm) if norm > 0 else 0.0


def judged_answers(path: Path, setting: str) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    mine = [r for r in rows if r["setting"] == setting and r["misaligned"] is not None]
    if not mine:
        have = sorted({r["setting"] for r in rows})
        raise StageError(f"{path} has no judged answers of setting {setting!r} (it has: {', '.join(have)})")
    return mine


def answer_mean(model: Any, tokenizer: Any, prompt: str, answer: str, layer: int) -> np.ndarray:
    """The residual at `layer` averaged over the answer's tokens, after the prompt."""
    import torch

    from harness.hooks import record_residuals

    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    answer_ids = tokenizer(" " + answer, add_special_tokens=False).input_ids or [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + answer_ids], device=next(model.parameters()).device)
    with torch.inference_mode(), record_residuals(model, [layer]) as recorded:
        model(input_ids=ids)
    return recorded[layer][0, len(prompt_ids) :].float().mean(0).cpu().numpy().astype(np.float64)


def em_vector(
    model: Any, tokenizer: Any, rows: Sequence[Mapping[str, Any]], questions: Mapping[str, str], layer: int
) -> tuple[np.ndarray, int, int]:
    """Mean over misaligned answers minus mean over aligned ones, and the two counts."""
    from harness.chat import render

    sums: dict[bool, list[np.ndarray]] = {True: [], False: []}
    for row in rows:
        prompt = render(tokenizer, [{"role": "user", "content": questions[row["question_id"]]}], True)
        sums[bool(row["misaligned"])].append(answer_mean(model, tokenizer, prompt, row["text"], layer))
    if not sums[True] or not sums[False]:
        raise StageError(
            f"an EM vector needs misaligned and aligned answers; got {len(sums[True])} misaligned and "
            f"{len(sums[False])} aligned (sample more answers in the em_eval stage)"
        )
    return np.mean(sums[True], 0) - np.mean(sums[False], 0), len(sums[True]), len(sums[False])


def _plot(names: Sequence[str], change: np.ndarray, path: Path, title: str) -> None:
    figure = new_figure(1.1 * len(names) + 3, 1.0 * len(names) + 2)
    axes = figure.add_subplot()
    bound = max(float(np.abs(change).max()), 1e-6)
    image = axes.imshow(change, cmap="RdBu_r", vmin=-bound, vmax=bound)
    axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axes.set_yticks(range(len(names)), names)
    axes.set_xlabel("target setting (steered)")
    axes.set_ylabel("EM vector of setting")
    for i in range(len(names)):
        for j in range(len(names)):
            axes.text(j, i, f"{change[i, j]:+.2f}", ha="center", va="center", fontsize=8)
    figure.colorbar(image, label="EM rate change vs unsteered")
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path)


def run(ctx: StageContext) -> dict[str, Any]:
    import torch

    from harness.activations import save_f32
    from harness.em import Measurement, misaligned_indicators
    from harness.hooks import add_to_residual, n_indices
    from harness.models import load_tokenizer
    from harness.models.adapters import active, load_stacked
    from harness.store import write_json
    from harness.upstream import adapter_dir, find_upstream

    p = with_defaults(ctx.params, SCHEMA)
    settings: dict[str, list[str]] = dict(p["settings"])
    source = find_upstream(ctx.upstream, "answers", "steering_transfer", only=False).dir / "answers.jsonl"
    if not source.is_file():
        raise StageError(f"no answers.jsonl in the `answers` stage ({source}); it must be an em_eval stage")
    measurement = Measurement.from_params(p, ctx.seed, ctx.log)
    text = {q.id: q.question for q in measurement.questions}
    roles = list(dict.fromkeys(r for rs in settings.values() for r in rs))
    adapters = {r: adapter_dir(ctx.upstream, "steering_transfer", only=False, role=r) for r in roles}
    model = load_stacked(p["base"], adapters)
    tokenizer = load_tokenizer(p["base"])
    layer = p["layer"] if p.get("layer") is not None else n_indices(model) // 2
    names = list(settings)

    vectors, counts = {}, {}
    for name in names:
        with active(model, settings[name]):
            rows = judged_answers(source, name)
            vectors[name], n_bad, n_good = em_vector(model, tokenizer, rows, text, layer)
        counts[name] = {"misaligned": n_bad, "aligned": n_good}
        ctx.log(f"{name}: EM vector at layer {layer} from {n_bad} misaligned and {n_good} aligned answers, "
                f"norm {np.linalg.norm(vectors[name]):.3f}")

    def em_rate(target: str, vector: np.ndarray | None) -> tuple[dict[str, Any], list[float]]:
        steering = nullcontext()
        if vector is not None:
            steering = add_to_residual(model, layer, torch.tensor(vector, dtype=torch.float32))
        with active(model, settings[target]), steering:
            judged, summary = measurement.run(model, tokenizer, target)
        return summary["em_rate"], misaligned_indicators(judged)

    rng = np.random.default_rng(ctx.seed)
    samples: dict[str, list[float]] = {}
    unsteered, transfer, control = {}, {}, {}
    for target in names:
        unsteered[target], samples[target] = em_rate(target, None)
    for source_name in names:
        vector = vectors[source_name] * p["multiplier"]
        direction = rng.normal(size=vector.shape)
        random = direction / np.linalg.norm(direction) * np.linalg.norm(vector)
        for target in names:
            key = f"{source_name}->{target}"
            transfer[key], samples[key] = em_rate(target, vector)
            control[key], samples[f"random({source_name})->{target}"] = em_rate(target, random)
            ctx.log(f"{key}: em_rate {transfer[key]['value']:.3f} (random {control[key]['value']:.3f}, "
                    f"unsteered {unsteered[target]['value']:.3f})")

    def changes(rates_by_pair: Mapping[str, Mapping[str, float]]) -> np.ndarray:
        return np.array([[rates_by_pair[f"{a}->{b}"]["value"] - unsteered[b]["value"] for b in names]
                         for a in names])

    change, random_change = changes(transfer), changes(control)
    cosines = {f"{a}|{b}": cosine(vectors[a], vectors[b]) for a in names for b in names}
    pairs = [cosines[f"{a}|{b}"] for i, a in enumerate(names) for b in names[i + 1 :]]
    self_effect = float(np.mean(np.diag(change)))
    cross_effect = float(np.mean(change[~np.eye(len(names), dtype=bool)])) if len(names) > 1 else 0.0
    metrics = {
        "mean_cosine": float(np.mean(pairs)) if pairs else 1.0,
        "self_effect": self_effect,
        "cross_effect": cross_effect,
        "random_effect": float(np.mean(random_change)),
        "self_minus_cross": self_effect - cross_effect,
        "layer": layer,
    }
    out = ctx.out_dir
    save_f32(out / "vectors.safetensors", {n: vectors[n].astype(np.float32) for n in names},
             metadata={"layer": str(layer), "what": "mean residual over answer tokens, misaligned - aligned"})
    write_json(out / "steering_transfer.json", {
        "layer": layer, "multiplier": p["multiplier"], "settings": settings, "counts": counts,
        "norms": {n: float(np.linalg.norm(vectors[n])) for n in names}, "cosines": cosines,
        "unsteered": unsteered, "transfer": transfer, "random": control,
        "change": change.tolist(), "random_change": random_change.tolist(), "metrics": metrics,
    })
    write_json(out / "samples.json", samples)
    _plot(names, change, out / "transfer.png", f"{ctx.stage}: EM-rate change when steered (layer {layer})")
    return metrics


KIND = StageKind(
    name="steering_transfer",
    run=run,
    params_schema=SCHEMA,
    metrics=METRICS,
    version=VERSION,
    input_params=("questions",),
    transport_params=tuple(f"judge.{key}" for key in TRANSPORT_KEYS),
    check=em_params,
    code_version=base_code_version(VERSION),
)
