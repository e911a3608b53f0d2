"""`steer`: add a probe's direction to the residual stream and watch the conflict answers move.

Upstream roles: `probe`, a stage that wrote `directions.safetensors` (tensors `probe.{i}`, a
unit vector whose positive side is label 1, e.g. "true in the real world", and
`mean_diff.{i}`, label-1 minus label-0 mean activations, for each hidden_states index i)
and whose metrics hold `best_layer`; and `adapter`, the finetune stage (`<dir>/adapter/`),
unless `use_adapter: false` steers the base model.

The steering vector at multiplier m is m * scale * u, with u the unit direction and
    scale = mean over conflict items of |residual at that index, decision token| / sqrt(d)
(`scale: residual_norm`, the typical size of one coordinate of the residual, so that
m = sqrt(d) adds a vector as long as the residual itself) or scale = 1 (`scale: unit`).
It is added at every position of the prompt and of generated tokens. The control is a
Gaussian direction drawn with the spec's seed, scaled to the same norm at each multiplier.

Measured on the conflict MCQs as token contrasts (`harness.contrast`): the true answer's
probability renormalized over {true token, false token} = sigmoid(logit difference), and
the logit difference itself, averaged over items. Artifacts:

    steering.json       the setup (layer, direction, scale, norms) and, for the direction and
                        the random control, the mean curves and per-item values per multiplier
    steering.png        mean true-answer probability against the multiplier, both directions
    generations.jsonl   {prompt, multiplier, text}: greedy continuations of the open-ended
                        prompts under the direction at every multiplier
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from harness.checks import base_code_version, check_base_param, mcqs_param
from harness.mcq import load_mcqs
from harness.plots import figure as new_figure
from harness.spec.validate import SPECS_DIR, with_defaults
from harness.stage import StageContext, StageError, StageKind
from harness.upstream import adapter_dir, find_upstream

VERSION = "1"
DIRECTIONS_FILE = "directions.safetensors"
METRICS = (
    "true_prob_at_zero",
    "true_prob_max",
    "slope",
    "random_slope",
    "effect",
    "random_effect",
    "effect_minus_random",
    "layer",
)


# --- collection ----------------------------------------------------------------------


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


def load_direction(path: Path, name: str, layer: int) -> Any:
    """The unit vector `<name>.<layer>` of a directions file, as a float32 torch tensor."""
    import torch
    from safetensors.numpy import load_file

    if not path.is_file():
        raise StageError(f"the probe stage wrote no {DIRECTIONS_FILE} (looked for {path})")
    tensors = load_file(str(path))
    key = f"{name}.{layer}"
    if key not in tensors:
        have = sorted(k for k in tensors if k.startswith(f"{name}."))
        raise StageError(f"{path} has no tensor {key!r} (it has {', '.join(have) or 'none of that name'})")
    vector = torch.from_numpy(tensors[key].astype("float32")).flatten()
    norm = float(vector.norm())
    if not math.isfinite(norm) or norm == 0:
        raise StageError(f"{path}: {key} has norm {norm}; a steering direction must be a nonzero vector")
    return vector / norm


def random_unit(dim: int, seed: int) -> Any:
    import torch

    generator = torch.Generator().manual_seed(seed)
    vector = torch.randn(dim, generator=generator)
    return vector / vector.norm()


# --- curves (pure) -------------------------------------------------------------------


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


def effect(rows: Sequence[Mapping[str, Any]], at_zero: float) -> float:
    return max(abs(r["true_prob"] - at_zero) for r in rows)


def curve_metrics(
    multipliers: Sequence[float],
    direction: Sequence[Mapping[str, Any]],
    random: Sequence[Mapping[str, Any]],
    at_zero: float,
    layer: int,
) -> dict[str, Any]:
    probs = [r["true_prob"] for r in direction]
    random_probs = [r["true_prob"] for r in random]
    eff, random_eff = effect(direction, at_zero), effect(random, at_zero)
    return {
        "true_prob_at_zero": at_zero,
        "true_prob_max": max(probs),
        "slope": slope(multipliers, probs),
        "random_slope": slope(multipliers, random_probs),
        "effect": eff,
        "random_effect": random_eff,
        "effect_minus_random": eff - random_eff,
        "layer": layer,
    }


# --- the model work ------------------------------------------------------------------


def _plot(
    multipliers: Sequence[float],
    direction: Sequence[Mapping[str, Any]],
    random: Sequence[Mapping[str, Any]],
    path: Path,
    title: str,
) -> None:

    figure = new_figure(6, 3.8)
    axes = figure.add_subplot()
    axes.plot(multipliers, [r["true_prob"] for r in direction], marker="o", label="steering direction")
    random_probs = [r["true_prob"] for r in random]
    axes.plot(multipliers, random_probs, marker="x", linestyle="--", label="random, same norm")
    axes.set_xlabel("multiplier")
    axes.set_ylabel("mean p(true answer | true or false)")
    axes.set_ylim(-0.02, 1.02)
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def _generate(model: Any, tokenizer: Any, prompt: str, chat: bool, max_new_tokens: int) -> str:
    import torch

    from harness.scoring import encode

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

    from harness.hooks import contrast_logit_diffs, record_residuals

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
    from harness.hooks import add_to_residual

    steering = add_to_residual(model, layer, vector) if bool(vector.any()) else nullcontext()
    with steering:
        return _generate(model, tokenizer, prompt, chat, max_new_tokens)


def run(ctx: StageContext) -> dict[str, Any]:
    from harness.contrast import contrasts
    from harness.hooks import add_to_residual, contrast_logit_diffs, n_indices
    from harness.models.base import load_model, load_tokenizer
    from harness.store import write_json, write_jsonl

    params = with_defaults(ctx.params, KIND.params_schema)
    base, mode, chat = params["base"], params["scoring"], params["chat_template"]
    probe = find_upstream(ctx.upstream, "probe", "steer", only=False)
    adapter = (
        adapter_dir(ctx.upstream, "steer", only=False)
        if params["use_adapter"]
        else None
    )
    layer = resolve_layer(params["layer"], probe.metrics)
    unit = load_direction(probe.dir / DIRECTIONS_FILE, params["direction"], layer)

    ctx.log(f"loading {base}" + (f" with the adapter {adapter}" if adapter else " (no adapter)"))
    tokenizer = load_tokenizer(base)
    model = load_model(base, adapter)
    top = n_indices(model) - 1
    if not 0 <= layer <= top:
        raise StageError(f"layer {layer} is out of range: {base} has hidden_states indices 0..{top}")
    dim = model.config.hidden_size
    if unit.numel() != dim:
        raise StageError(f"the {params['direction']} direction has {unit.numel()} dims, the residual {dim}")
    items = contrasts(tokenizer, load_mcqs(Path(params["mcqs"])), mode, chat)
    batch_size = params["batch_size"]

    zero, residual_norm = _unsteered(model, tokenizer, items, layer, batch_size)
    scale = residual_norm / math.sqrt(dim) if params["scale"] == "residual_norm" else 1.0
    control = random_unit(dim, ctx.seed)
    ctx.log(
        f"layer {layer}: mean residual norm {residual_norm:.3f}, {params['direction']} direction, "
        f"vector norm {scale:.4f} per unit of multiplier"
    )

    multipliers = sorted({float(m) for m in params["multipliers"]} | {0.0})
    diffs: dict[str, dict[float, list[float]]] = {"direction": {}, "random": {}}
    for m in multipliers:
        for name, u in (("direction", unit), ("random", control)):
            if m == 0:
                diffs[name][m] = zero.tolist()  # no hook at all: exactly the unsteered model
                continue
            with add_to_residual(model, layer, m * scale * u):
                diffs[name][m] = contrast_logit_diffs(model, tokenizer, items, batch_size).tolist()
        ctx.log(
            f"multiplier {m:+g}: true prob {sum(map(sigmoid, diffs['direction'][m])) / len(items):.3f} "
            f"(random {sum(map(sigmoid, diffs['random'][m])) / len(items):.3f})"
        )
    direction_curve = curve(multipliers, diffs["direction"])
    random_curve = curve(multipliers, diffs["random"])
    at_zero = direction_curve[multipliers.index(0.0)]["true_prob"]
    metrics = curve_metrics(multipliers, direction_curve, random_curve, at_zero, layer)

    generations = []
    for prompt in params["prompts"]:
        for m in multipliers:
            vector = m * scale * unit
            text = _steered_text(model, tokenizer, prompt, chat, params["max_new_tokens"], layer, vector)
            generations.append({"prompt": prompt, "multiplier": m, "text": text})
    ctx.log(f"{len(generations)} greedy generations for {len(params['prompts'])} prompts")

    write_json(
        ctx.out_dir / "steering.json",
        {
            "base": base,
            "adapter": str(adapter) if adapter else None,
            "mcqs": str(params["mcqs"]),
            "scoring": mode,
            "layer": layer,
            "direction": params["direction"],
            "scale_mode": params["scale"],
            "vector_norm_per_unit_multiplier": scale,
            "mean_residual_norm": residual_norm,
            "d_model": dim,
            "seed": ctx.seed,
            "items": [c.item.id for c in items],
            "multipliers": multipliers,
            "curves": {"direction": direction_curve, "random": random_curve},
            "metrics": metrics,
        },
    )
    write_jsonl(ctx.out_dir / "generations.jsonl", generations)
    _plot(
        multipliers,
        direction_curve,
        random_curve,
        ctx.out_dir / "steering.png",
        f"{ctx.stage}: {params['direction']} direction at hidden_states[{layer}]"
        + (" (+ adapter)" if adapter else ""),
    )
    ctx.log(
        f"effect {metrics['effect']:.3f} vs random {metrics['random_effect']:.3f}, "
        f"slope {metrics['slope']:+.4f} per unit of multiplier"
    )
    return metrics


def check(params: Mapping[str, Any], spec_dir: Path) -> None:
    check_base_param(params)
    mcqs_param(params, spec_dir, conflict_for="steering")


KIND = StageKind(
    name="steer",
    run=run,
    params_schema=SPECS_DIR / "stages" / "steer.schema.json",
    metrics=METRICS,
    version=VERSION,
    input_params=("mcqs",),
    transport_params=("batch_size",),
    check=check,
    code_version=base_code_version(VERSION),
)
