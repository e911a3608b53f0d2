"""`steer`: add a truth direction to the residual stream and see whether the conflict answers
move the way the spec claims, beyond what random directions of the same norm do.

Upstream roles: `activations`, an extract_activations stage (its statements' residuals at
the decision token, every layer, and their `labels`); `probe`, a train_probe stage, only
for `layer: best` (its `best_layer` metric: where that stage found the label readable, on
all its statements, the ones held out here included; it never saw the steering outcome);
and `adapter`, the finetune stage (`<dir>/adapter/`), unless `use_adapter: false` steers
the base model.

The direction, fit here so that it never sees the items it is judged on: the mean residual
at `layer` of the statements with `label` 1 minus that of those with `label` 0, made unit
length (positive: toward label 1), over the *fit statements*: every statement of the
activations except those that restate a steering item (the same id, or one's words, lower
case and punctuation dropped, contained in the other's) and every statement of their
`group` (a statement's contrary). steering.json lists the statements held out. The match is
textual: a steering question that puts a statement in other words is not caught.

The steering vector at multiplier m is m * scale * u, u the unit direction and
    scale = mean over steering items of |residual at that index, decision token| / sqrt(d)
(`scale: residual_norm`, the size of one coordinate of the residual, so that m = sqrt(d)
adds a vector as long as the residual itself) or scale = 1 (`scale: unit`). It is added at
every position of the prompt and of generated tokens.

Measured on the conflict MCQs as token contrasts (`harness.lab.contrast`): the true answer's
probability renormalized over {true token, false token} = sigmoid(logit difference), mean
p(m) over items. The spec states its claim with `expect`: `increase` (a positive multiplier,
toward label 1, raises p; a negative one lowers it) or `decrease`. With s = +1 or -1 for
these, the *effect* is the largest move the claimed way,
    effect = max over m != 0 of s * sign(m) * (p(m) - p(0)),
negative when every multiplier moves the answers against the claim. The null: `n_random`
Gaussian directions drawn with the spec's seed, each scaled like u and measured at the same
multipliers, each giving the same statistic. Metrics: `effect`; `random_effect_mean` and
`random_effect_q95` (mean and 95th percentile of the null); `effect_minus_random` and
`effect_minus_random_q95` (effect minus those); `p_value` = (1 + #{random effects >=
effect}) / (1 + n_random), so with n_random < 19 it cannot reach 0.05; `slope` (least-
squares slope of p on the multiplier, unsigned); `true_prob_at_zero`; `layer`; `n_items`;
`n_fit_statements`. The p-value is about the direction against directions of its norm, on
these items: the items are not resampled.

Artifacts:
    steering.json       the setup (layer, label, claim, scale, norms, the fit and held-out
                        statements), the direction's curve with per-item values, and per
                        random direction its mean curve and effect
    steering.png        mean true-answer probability against the multiplier: the direction,
                        the random directions' mean and their 5-95% band
    generations.jsonl   {prompt, multiplier, text}: greedy continuations of the open-ended
                        prompts under the direction at every multiplier
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.api import stage_kind
from harness.core.stage import Role, StageContext, StageError
from harness.core.upstream import adapter_dir, adapter_role, find_upstream
from harness.lab.activations import layer_name
from harness.lab.checks import mcqs_param
from harness.lab.mcq import load_mcqs
from harness.lab.plots import figure as new_figure
from harness.lab.stats import monte_carlo_p

CLAIM_SIGN = {"increase": 1, "decrease": -1}
METRICS = (
    "true_prob_at_zero",
    "slope",
    "effect",
    "random_effect_mean",
    "random_effect_q95",
    "effect_minus_random",
    "effect_minus_random_q95",
    "p_value",
    "layer",
    "n_items",
    "n_fit_statements",
)


# --- upstream ------------------------------------------------------------------------


def resolve_layer(layer: int | str, probe_metrics: Mapping[str, Any]) -> int:
    """`layer` itself, or the probe's `best_layer` metric for "best"."""
    if layer != "best":
        return int(layer)
    best = probe_metrics.get("best_layer")
    if isinstance(best, Mapping):  # a metric stored with a confidence interval
        best = best.get("value")
    if not isinstance(best, (int, float)) or isinstance(best, bool) or best != int(best):
        raise StageError(f"layer: best, but the probe stage's best_layer metric is {best!r}, not an index")
    return int(best)


def _words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def fit_split(metadata: Sequence[Mapping[str, Any]], items: Sequence[Any]) -> tuple[list[int], list[str]]:
    """The indices of the statements the direction may be fit on, and the ids held out: every
    statement that restates a steering item (same id, or one's words within the other's) and
    every statement of its group."""
    questions = [(str(item.id), _words(item.question)) for item in items]

    def restates(row: Mapping[str, Any]) -> bool:
        text = _words(str(row["text"]))
        return any(row["id"] == qid or (q and text and (q in text or text in q)) for qid, q in questions)

    def group(row: Mapping[str, Any]) -> str:
        return str(row.get("group", f"item:{row['id']}"))

    held_groups = {group(row) for row in metadata if restates(row)}
    fit = [i for i, row in enumerate(metadata) if group(row) not in held_groups]
    held = [str(row["id"]) for row in metadata if group(row) in held_groups]
    return fit, held


def mean_difference_direction(
    activations: np.ndarray, metadata: Sequence[Mapping[str, Any]], fit: Sequence[int], label: str
) -> np.ndarray:
    """Unit vector of mean(label 1) - mean(label 0) over the fit statements."""
    labels = []
    for i in fit:
        row_labels = metadata[i].get("labels", {})
        if label not in row_labels:
            known = ", ".join(sorted(row_labels)) or "none"
            raise StageError(f"statement {metadata[i]['id']!r} has no label {label!r} (its labels: {known})")
        labels.append(int(row_labels[label]))
    y, X = np.asarray(labels), activations[list(fit)].astype(np.float64)
    if not (y == 1).any() or not (y == 0).any():
        raise StageError(
            f"the {len(fit)} statements left to fit the direction on (those restating no steering item) "
            f"need both values of label {label!r}; they have only {sorted(set(labels)) or 'none'}"
        )
    difference = X[y == 1].mean(axis=0) - X[y == 0].mean(axis=0)
    norm = float(np.linalg.norm(difference))
    if not math.isfinite(norm) or norm == 0:
        raise StageError(f"the mean difference of label {label!r} has norm {norm}; nothing to steer with")
    return difference / norm


def random_units(n: int, dim: int, seed: int) -> Any:
    """`n` Gaussian directions of unit norm, [n, dim], the same for the same seed."""
    import torch

    vectors = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return vectors / vectors.norm(dim=1, keepdim=True)


# --- curves and the null (pure) ------------------------------------------------------


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def curve(multipliers: Sequence[float], diffs: Mapping[float, Sequence[float]]) -> list[dict[str, Any]]:
    """Per multiplier: mean true-answer probability (over {true, false}), mean logit difference,
    and the per-item values."""
    rows = []
    for m in multipliers:
        ld = [float(x) for x in diffs[m]]
        probs = [sigmoid(x) for x in ld]
        rows.append(
            {
                "multiplier": m,
                "true_prob": sum(probs) / len(probs),
                "logit_diff": sum(ld) / len(ld),
                "item_true_prob": probs,
                "item_logit_diff": ld,
            }
        )
    return rows


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys on xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return math.nan
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def claimed_effect(multipliers: Sequence[float], probs: Sequence[float], expect: str) -> float:
    """The largest move of the mean true-answer probability the claimed way: max over m != 0
    of s * sign(m) * (p(m) - p(0)), s = +1 for `increase`, -1 for `decrease`."""
    at_zero = probs[list(multipliers).index(0.0)]
    sign = CLAIM_SIGN[expect]
    moves = [sign * math.copysign(1, m) * (p - at_zero) for m, p in zip(multipliers, probs, strict=True) if m]
    return max(moves)


def null_summary(observed: float, null: Sequence[float]) -> dict[str, float]:
    """The null's mean and 95th percentile, the observed effect's margins over them, and the
    p-value (1 + #{null >= observed}) / (1 + n)."""
    values = np.asarray(null, dtype=float)
    mean, q95 = float(values.mean()), float(np.quantile(values, 0.95))
    return {
        "random_effect_mean": mean,
        "random_effect_q95": q95,
        "effect_minus_random": observed - mean,
        "effect_minus_random_q95": observed - q95,
        "p_value": monte_carlo_p(observed, values),
    }


# --- the model work ------------------------------------------------------------------


def plot_steering(
    multipliers: Sequence[float],
    direction: Sequence[float],
    random: np.ndarray,
    path: Path,
    title: str,
) -> Any:
    """The steered curve against the band of random directions' curves. Returns the figure."""
    figure = new_figure(6, 3.8)
    axes = figure.add_subplot()
    axes.plot(multipliers, direction, marker="o", label="steering direction")
    low, high = np.quantile(random, [0.05, 0.95], axis=0)
    band = f"{len(random)} random directions of the same norm: 5-95%"
    axes.fill_between(multipliers, low, high, alpha=0.25, color="gray", label=band)
    axes.plot(multipliers, random.mean(0), color="gray", linestyle="--", label="random: mean")
    axes.set_xlabel("multiplier")
    axes.set_ylabel("mean p(true answer | true or false)")
    axes.set_ylim(-0.02, 1.02)
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return figure


def _generate(model: Any, tokenizer: Any, prompt: str, chat: bool, max_new_tokens: int) -> str:
    import torch

    from harness.lab.scoring import encode

    if chat:
        messages = [{"role": "user", "content": prompt}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([encode(tokenizer, prompt, chat)], device=next(model.parameters()).device)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _unsteered(
    model: Any, tokenizer: Any, items: Sequence[Any], layer: int, batch_size: int
) -> tuple[Any, float]:
    """The unsteered logit differences and the mean residual norm at `layer`, decision token."""
    import torch

    from harness.lab.hooks import contrast_logit_diffs, record_residuals

    norms = torch.empty(len(items))

    @contextmanager
    def keep_norms(rows: list[int], last: torch.Tensor) -> Any:
        with record_residuals(model, [layer]) as recorded:
            yield
        states = recorded[layer]
        at_decision = states[torch.arange(len(rows), device=states.device), last.to(states.device)]
        norms[rows] = at_decision.float().norm(dim=-1).cpu()

    zero = contrast_logit_diffs(model, tokenizer, items, batch_size, keep_norms)
    return zero, float(norms.mean())


def _steered_text(
    model: Any, tokenizer: Any, prompt: str, chat: bool, max_new_tokens: int, layer: int, vector: Any
) -> str:
    from harness.lab.hooks import add_to_residual

    steering = add_to_residual(model, layer, vector) if bool(vector.any()) else nullcontext()
    with steering:
        return _generate(model, tokenizer, prompt, chat, max_new_tokens)


def _direction(ctx: StageContext, params: Mapping[str, Any], layer: int, items: Sequence[Any]):
    """The unit direction (torch, float32), the fit statements' count and the held-out ids."""
    import torch

    from harness.lab.activations import CONVENTION_FILE, layer_count, read_layer, read_metadata

    source = find_upstream(ctx.upstream, "activations", "steer", only=False)
    if not (source.dir / CONVENTION_FILE).is_file():
        raise StageError(
            f"upstream stage {source.name!r} ({source.kind}) wrote no {CONVENTION_FILE}: steer fits its "
            "direction on the output of an extract_activations stage (role `activations`)"
        )
    n_layers = layer_count(source.dir)
    if not 0 <= layer < n_layers:
        raise StageError(f"layer {layer}: the activations have layer indices 0..{n_layers - 1}")
    metadata = read_metadata(source.dir)
    fit, held = fit_split(metadata, [c.item for c in items])
    unit = mean_difference_direction(read_layer(source.dir, layer), metadata, fit, params["label"])
    return torch.from_numpy(unit.astype(np.float32)), len(fit), held


def check(params: Mapping[str, Any], spec_dir: Path) -> None:
    mcqs_param(params, spec_dir, conflict_for="steering")


@dataclass(frozen=True)
class SteeringSetup:
    """What the measurements need: the model with its items, and the direction to steer with."""

    layer: int
    adapter: Path | None
    tokenizer: Any
    model: Any
    items: list[Any]  # the conflict MCQs as token contrasts
    unit: Any  # the unit direction, torch float32 [d_model]
    n_fit: int  # statements the direction was fit on
    held_out: list[str]  # ids of the statements held out as restating steering items


@dataclass(frozen=True)
class SteeringCurves:
    """The direction's and the random directions' mean true-answer probabilities, and the metrics."""

    multipliers: list[float]  # 0 included
    residual_norm: float  # mean residual norm at the layer, decision token
    scale: float  # the vector's norm per unit of multiplier
    probs: list[float]  # the direction's mean true-answer probability per multiplier
    direction: list[dict[str, Any]]  # `curve` rows, per-item values included
    random_probs: np.ndarray  # [n_random, multipliers]
    random_effects: list[float]
    metrics: dict[str, Any]


def _load_setup(ctx: StageContext) -> SteeringSetup:
    """Resolve the layer and the adapter, fit the direction, load the model; check they agree."""
    from harness.lab.contrast import contrasts
    from harness.lab.hooks import n_indices
    from harness.lab.models.base import load_model, load_tokenizer

    params = ctx.params
    base = params["base"]
    probe_metrics: Mapping[str, Any] = {}
    if params["layer"] == "best":
        probe_metrics = find_upstream(ctx.upstream, "probe", "steer", only=False).metrics
    layer = resolve_layer(params["layer"], probe_metrics)
    adapter = adapter_dir(ctx.upstream, "steer", only=False) if params["use_adapter"] else None

    tokenizer = load_tokenizer(base)
    items = contrasts(tokenizer, load_mcqs(Path(params["mcqs"])), params["scoring"], params["chat_template"])
    unit, n_fit, held_out = _direction(ctx, params, layer, items)
    ctx.log(
        f"direction: mean difference of label {params['label']!r} at layer {layer} over {n_fit} statements "
        f"({len(held_out)} held out as restating steering items)"
    )

    ctx.log(f"loading {base}" + (f" with the adapter {adapter}" if adapter else " (no adapter)"))
    model = load_model(base, adapter)
    top = n_indices(model) - 1
    if not 0 <= layer <= top:
        raise StageError(f"layer {layer} is out of range: {base} has hidden_states indices 0..{top}")
    dim = model.config.hidden_size
    if unit.numel() != dim:
        raise StageError(f"the direction has {unit.numel()} dims, the residual {dim}")
    return SteeringSetup(layer, adapter, tokenizer, model, items, unit, n_fit, held_out)


def _measure_curves(ctx: StageContext, setup: SteeringSetup) -> SteeringCurves:
    """Mean true-answer probability per multiplier under the direction and each random one."""
    from harness.lab.hooks import add_to_residual, contrast_logit_diffs

    params = ctx.params
    model, tokenizer, items, layer = setup.model, setup.tokenizer, setup.items, setup.layer
    dim, batch_size = model.config.hidden_size, params["batch_size"]
    zero, residual_norm = _unsteered(model, tokenizer, items, layer, batch_size)
    scale = residual_norm / math.sqrt(dim) if params["scale"] == "residual_norm" else 1.0
    controls = random_units(params["n_random"], dim, ctx.seed)
    ctx.log(f"layer {layer}: mean residual norm {residual_norm:.3f}, vector norm {scale:.4f} per unit of m")

    multipliers = sorted({float(m) for m in params["multipliers"]} | {0.0})

    def mean_probs(u: Any, per_item: dict[float, list[float]] | None = None) -> list[float]:
        means = []
        for m in multipliers:
            if m == 0:
                diffs = zero.tolist()  # no hook at all: exactly the unsteered model
            else:
                with add_to_residual(model, layer, m * scale * u):
                    diffs = contrast_logit_diffs(model, tokenizer, items, batch_size).tolist()
            if per_item is not None:
                per_item[m] = diffs
            means.append(sum(map(sigmoid, diffs)) / len(diffs))
        return means

    per_item: dict[float, list[float]] = {}
    probs = mean_probs(setup.unit, per_item)
    random_probs = np.array([mean_probs(u) for u in controls])
    metrics, random_effects = _steering_metrics(multipliers, probs, random_probs, params["expect"], setup)
    direction = curve(multipliers, per_item)
    return SteeringCurves(
        multipliers, residual_norm, scale, probs, direction, random_probs, random_effects, metrics
    )


def _steering_metrics(
    multipliers: list[float], probs: list[float], random_probs: np.ndarray, expect: str, setup: SteeringSetup
) -> tuple[dict[str, Any], list[float]]:
    """The metrics, and each random direction's effect (the null)."""
    effect = claimed_effect(multipliers, probs, expect)
    random_effects = [claimed_effect(multipliers, row, expect) for row in random_probs]
    metrics = {
        "true_prob_at_zero": probs[multipliers.index(0.0)],
        "slope": slope(multipliers, probs),
        "effect": effect,
        **null_summary(effect, random_effects),
        "layer": setup.layer,
        "n_items": len(setup.items),
        "n_fit_statements": setup.n_fit,
    }
    return metrics, random_effects


def _steered_generations(ctx: StageContext, setup: SteeringSetup, curves: SteeringCurves) -> list[dict]:
    """Greedy continuations of the open-ended prompts under the direction at every multiplier."""
    params = ctx.params
    model, tokenizer, chat, layer = setup.model, setup.tokenizer, params["chat_template"], setup.layer
    generations = []
    for prompt in params["prompts"]:
        for m in curves.multipliers:
            vector = m * curves.scale * setup.unit
            text = _steered_text(model, tokenizer, prompt, chat, params["max_new_tokens"], layer, vector)
            generations.append({"prompt": prompt, "multiplier": m, "text": text})
    ctx.log(f"{len(generations)} greedy generations for {len(params['prompts'])} prompts")
    return generations


def _write_artifacts(
    ctx: StageContext, setup: SteeringSetup, curves: SteeringCurves, generations: list[dict]
) -> None:
    """steering.json, generations.jsonl and steering.png."""
    from harness.core.store import relative_path, write_json, write_jsonl

    params, adapter = ctx.params, setup.adapter
    write_json(
        ctx.out_dir / "steering.json",
        {
            "base": params["base"],
            "adapter": relative_path(adapter, ctx.out_dir) if adapter else None,
            "mcqs": relative_path(params["mcqs"], ctx.spec_file.parent),
            "scoring": params["scoring"],
            "layer": setup.layer,
            "label": params["label"],
            "expect": params["expect"],
            "scale_mode": params["scale"],
            "vector_norm_per_unit_multiplier": curves.scale,
            "mean_residual_norm": curves.residual_norm,
            "d_model": setup.model.config.hidden_size,
            "seed": ctx.seed,
            "items": [c.item.id for c in setup.items],
            "fit_statements": setup.n_fit,
            "held_out_statements": setup.held_out,
            "multipliers": curves.multipliers,
            "direction": curves.direction,
            "random": {"true_prob": curves.random_probs.tolist(), "effects": curves.random_effects},
            "metrics": curves.metrics,
        },
    )
    write_jsonl(ctx.out_dir / "generations.jsonl", generations)
    plot_steering(
        curves.multipliers,
        curves.probs,
        curves.random_probs,
        ctx.out_dir / "steering.png",
        f"{ctx.stage}: {params['label']} mean difference at layer {setup.layer} ({layer_name(setup.layer)})"
        + (" (+ adapter)" if adapter else ""),
    )


@stage_kind(
    needs=lambda params: (
        Role("activations", "the activations an extract_activations stage writes"),
        *(
            [Role("probe", "the best_layer metric of a train_probe stage, for `layer: best`")]
            if params["layer"] == "best"
            else []
        ),
        *([adapter_role(only=False)] if params["use_adapter"] else []),
    ),
    metrics=METRICS,
    input_params=("mcqs",),
    transport_params=("batch_size",),
    check=check,
)
def run(ctx: StageContext) -> dict[str, Any]:
    setup = _load_setup(ctx)
    curves = _measure_curves(ctx, setup)
    generations = _steered_generations(ctx, setup, curves)
    _write_artifacts(ctx, setup, curves, generations)
    params, metrics = ctx.params, curves.metrics
    ctx.log(
        f"effect ({params['expect']}) {metrics['effect']:+.3f}; {params['n_random']} random directions: mean "
        f"{metrics['random_effect_mean']:+.3f}, 95th percentile {metrics['random_effect_q95']:+.3f}; "
        f"p = {metrics['p_value']:.3f}"
    )
    return metrics
