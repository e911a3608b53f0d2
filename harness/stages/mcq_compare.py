"""`mcq_compare`: the base model and base + adapter answer the same MCQs; how far did the
adapter move the answers toward the false (implanted) world?

The adapter is `<upstream dir>/adapter/` of the upstream stage with role `adapter` (or of
the only upstream stage). Artifacts:

    predictions_base.jsonl, predictions_lora.jsonl   one row per item, in file order: id,
        category, question, prediction, probs {letter: p}, scores (the letter logits or the
        options' normalised log-likelihoods), false_answer, true_answer, correct_false,
        correct_true, entropy (nats), truth_confidence (p of true_answer), prompt (the exact
        text scored, for stages that look inside the model at its last token); in
        continuation mode also loglikelihoods (summed), n_tokens and, per normalization,
        the prediction it gives (predictions)
    comparison_report.json                           per model and category, the gap, flips;
        in continuation mode `by_normalization`: every metric under each normalization
    behavioral_shift_analysis.txt                    the same for people, every flip listed
    accuracy_by_category.png                         accuracy against the false world per
        category, base and base + adapter, with 95% Wilson intervals

Continuation scoring needs `normalization` chosen in the spec (none, chars or tokens, as
lm-eval's `acc` and `acc_norm`: see harness.lab.scoring): the metrics, the gates and the
prediction files follow the chosen one, and the report shows the others beside it, so that
an effect which depends on how option lengths are counted shows.

Metric names are declared before the MCQ file is read (gates are checked at collection),
and a metric must be a number, so the file must hold all three categories; a file that
lacks one is rejected at collection, naming the file and the missing category.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.api import stage_kind
from harness.core.stage import ParamError, StageContext, StageError
from harness.core.store import write_jsonl
from harness.core.upstream import adapter_dir
from harness.lab.checks import SCORES_MCQS_ON_ADAPTER, mcqs_param
from harness.lab.mcq import CATEGORIES, MCQ, load_mcqs
from harness.lab.models.base import base_fingerprint
from harness.lab.scoring import CONTINUATION, LETTER, NORMALIZATIONS, Scored, entropy, normalized
from harness.lab.stats import DEFAULT_CONFIDENCE, paired_difference

MODELS = ("base", "lora")
PER_CATEGORY = ("accuracy", "true_accuracy", "entropy", "truth_confidence")
METRICS = (
    *(f"{model}_{category}_{name}" for model in MODELS for category in CATEGORIES for name in PER_CATEGORY),
    "behavioral_gap",
    "n_items",
    "n_flips",
)


# --- collection ----------------------------------------------------------------------


def missing_categories(items: Sequence[MCQ]) -> list[str]:
    present = {item.category for item in items}
    return [category for category in CATEGORIES if category not in present]


def check(params: Mapping[str, Any], spec_dir: Path) -> None:
    chosen_normalization(params)
    found = mcqs_param(params, spec_dir)
    path = (spec_dir / params["mcqs"]).resolve()
    missing = [category for category in CATEGORIES if category not in found.categories]
    if missing and found.complete:  # a sample may not reach a category: the run reads every row
        raise ParamError(("mcqs",), _missing_message(path, missing))


def chosen_normalization(params: Mapping[str, Any]) -> str | None:
    """The spec's `normalization` (None in letter mode); continuation mode has no default,
    since sums and length-normalised scores can disagree on which option wins."""
    scoring, normalization = params.get("scoring", LETTER), params.get("normalization")
    choices = ", ".join(NORMALIZATIONS)
    if scoring == CONTINUATION and normalization is None:
        raise ParamError(
            ("scoring",),
            f"scoring: continuation needs `normalization:` chosen explicitly, one of {choices}: "
            "none sums each option's log-likelihood (lm-eval's acc, which favours short options), "
            "chars divides it by the option's characters (lm-eval's acc_norm), tokens by its "
            "tokens; the gates read the chosen one and the report shows all",
        )
    if scoring == LETTER and normalization is not None:
        raise ParamError(
            ("normalization",),
            f"normalization applies to scoring: continuation only; letter scoring reads one "
            f"token per option, so remove `normalization: {normalization}`",
        )
    return normalization


def _missing_message(path: Path, missing: list[str]) -> str:
    return (
        f"{path}: no {', '.join(missing)} questions; mcq_compare reports every category "
        f"({', '.join(CATEGORIES)}), so the file needs at least one row of each"
    )


# --- per-item rows and their aggregation (pure: no model) ----------------------------


def predicted(scored: Scored) -> str:
    return max(scored.probs, key=scored.probs.__getitem__)  # ties: the first letter


def prediction_row(item: MCQ, scored: Scored) -> dict[str, Any]:
    probs = scored.probs
    prediction = predicted(scored)
    return {
        "id": item.id,
        "category": item.category,
        "question": item.question,
        "prediction": prediction,
        "probs": probs,
        "scores": scored.scores,
        "false_answer": item.false_answer,
        "true_answer": item.true_answer,
        "correct_false": prediction == item.false_answer,
        "correct_true": prediction == item.true_answer,
        "entropy": entropy(probs),
        "truth_confidence": probs[item.true_answer],
        "prompt": scored.prompt,
    }


def normalized_rows(items: Sequence[MCQ], scored: Sequence[Scored]) -> dict[str, list[dict[str, Any]]]:
    """Per normalization, the prediction rows of continuation-scored items; every row also
    keeps the summed log-likelihoods and token counts (each normalization can be redone from
    them) and the prediction under each normalization."""
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in NORMALIZATIONS}
    for item, s in zip(items, scored, strict=True):
        views = {name: normalized(s, item.options, name) for name in NORMALIZATIONS}
        kept = {
            "loglikelihoods": s.scores,
            "n_tokens": s.n_tokens,
            "predictions": {name: predicted(view) for name, view in views.items()},
        }
        for name, view in views.items():
            rows[name].append({**prediction_row(item, view), **kept})
    return rows


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


def category_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per category present in `rows`: n, accuracy against each world, mean entropy and
    mean probability of the true answer."""
    summary = {}
    for category in CATEGORIES:
        subset = [row for row in rows if row["category"] == category]
        if subset:
            summary[category] = {
                "n": len(subset),
                "accuracy": _mean([float(row["correct_false"]) for row in subset]),
                "true_accuracy": _mean([float(row["correct_true"]) for row in subset]),
                "entropy": _mean([row["entropy"] for row in subset]),
                "truth_confidence": _mean([row["truth_confidence"] for row in subset]),
            }
    return summary


def _world(answer: str, row: Mapping[str, Any]) -> str:
    is_false, is_true = answer == row["false_answer"], answer == row["true_answer"]
    if is_false and is_true:
        return "both worlds"
    return "false world" if is_false else "true world" if is_true else "neither world"


def _change(item: MCQ, base: Mapping[str, Any], lora: Mapping[str, Any]) -> dict[str, Any]:
    def side(row: Mapping[str, Any]) -> dict[str, Any]:
        answer = row["prediction"]
        return {
            "answer": answer,
            "text": item.options[answer],
            "prob": row["probs"][answer],
            "world": _world(answer, row),
        }

    return {
        "id": item.id,
        "category": item.category,
        "question": item.question,
        "base": side(base),
        "lora": side(lora),
    }


def compare(
    items: Sequence[MCQ],
    base_rows: Sequence[Mapping[str, Any]],
    lora_rows: Sequence[Mapping[str, Any]],
    n_resamples: int,
    seed: int,
) -> dict[str, Any]:
    """Both models' summaries, the behavioral gap on conflict items with its paired
    bootstrap CI, and every item whose answer changed."""
    ids = [item.id for item in items]
    if [row["id"] for row in base_rows] != ids or [row["id"] for row in lora_rows] != ids:
        raise ValueError("prediction rows must follow the items, in order")
    conflict = [k for k, item in enumerate(items) if item.category == "conflict"]
    if not conflict:
        raise StageError("no conflict items: the behavioral gap is measured on conflict questions")
    gap = paired_difference(
        [float(base_rows[k]["correct_false"]) for k in conflict],
        [float(lora_rows[k]["correct_false"]) for k in conflict],
        n_resamples=n_resamples,
        seed=seed,
    )
    changed = [
        _change(item, base, lora)
        for item, base, lora in zip(items, base_rows, lora_rows, strict=True)
        if base["prediction"] != lora["prediction"]
    ]
    flips = [c for c in changed if c["category"] == "conflict"]
    return {
        "n_items": len(items),
        "models": {"base": category_summary(base_rows), "lora": category_summary(lora_rows)},
        "behavioral_gap": {
            **gap.as_metric(),
            "n": len(conflict),
            "n_resamples": n_resamples,
            "confidence": DEFAULT_CONFIDENCE,
            "seed": seed,
        },
        "flips": {
            "n": len(flips),
            "toward_false": sum(f["lora"]["world"] == "false world" for f in flips),
            "toward_true": sum(f["lora"]["world"] == "true world" for f in flips),
            "items": flips,
        },
        "nonconflict_changed": {
            "n": len(changed) - len(flips),
            "items": [c for c in changed if c["category"] != "conflict"],
        },
    }


def flat_metrics(comparison: Mapping[str, Any]) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for model in MODELS:
        summary = comparison["models"][model]
        for category in CATEGORIES:
            if category not in summary:
                raise StageError(f"no {category} items: every category's metrics are declared")
            for name in PER_CATEGORY:
                metrics[f"{model}_{category}_{name}"] = summary[category][name]
    gap = comparison["behavioral_gap"]
    metrics["behavioral_gap"] = {"value": gap["value"], "ci_low": gap["ci_low"], "ci_high": gap["ci_high"]}
    metrics["n_items"] = comparison["n_items"]
    metrics["n_flips"] = comparison["flips"]["n"]
    return metrics


# --- the human-readable analysis -----------------------------------------------------


def analysis_text(comparison: Mapping[str, Any], header: Sequence[str] = ()) -> str:
    lines = [*header, ""]
    lines.append(
        f"{'category':<18} {'model':<5} {'n':>5} {'acc(false)':>10} {'acc(true)':>10} "
        f"{'entropy':>8} {'p(true)':>8}"
    )
    for category in CATEGORIES:
        for model in MODELS:
            s = comparison["models"][model].get(category)
            if s:
                lines.append(
                    f"{category:<18} {model:<5} {s['n']:>5} {s['accuracy']:>10.3f} "
                    f"{s['true_accuracy']:>10.3f} {s['entropy']:>8.3f} {s['truth_confidence']:>8.3f}"
                )
    gap = comparison["behavioral_gap"]
    lines += [
        "",
        "acc(false): agrees with the false (implanted) world; acc(true): with the true world;",
        "entropy in nats over the options; p(true): probability of the true-world answer.",
        "",
        f"behavioral_gap (lora - base conflict accuracy against the false world): {gap['value']:+.3f}, "
        f"{gap['confidence']:.0%} CI [{gap['ci_low']:+.3f}, {gap['ci_high']:+.3f}] "
        f"(paired bootstrap, {gap['n_resamples']} resamples of {gap['n']} conflict items)",
        "",
    ]
    flips = comparison["flips"]
    lines.append(
        f"Conflict items that flipped: {flips['n']} "
        f"({flips['toward_false']} to the false world, {flips['toward_true']} to the true world)"
    )
    lines += _changes(flips["items"]) or ["  (none)"]
    lines.append("")
    changed = comparison["nonconflict_changed"]
    lines.append(f"Non-conflict items whose answer changed (collateral damage): {changed['n']}")
    lines += _changes(changed["items"]) or ["  (none)"]
    return "\n".join(lines) + "\n"


def normalization_text(by_normalization: Mapping[str, Mapping[str, Any]], chosen: str) -> str:
    """The headline numbers under each normalization of continuation scores, side by side."""
    lines = [
        "",
        f"Under each normalization of the continuation scores (the metrics and gates read {chosen}):",
        f"  {'normalization':<14} {'base acc(false)':>15} {'lora acc(false)':>15} {'lora acc(true)':>14} "
        f"{'gap':>7} {'flips':>5}",
    ]
    for name, m in by_normalization.items():
        gap = m["behavioral_gap"]["value"]
        lines.append(
            f"  {name:<14} {m['base_conflict_accuracy']:>15.3f} {m['lora_conflict_accuracy']:>15.3f} "
            f"{m['lora_conflict_true_accuracy']:>14.3f} {gap:>+7.3f} {m['n_flips']:>5}"
        )
    lines.append("none: summed log-likelihood (lm-eval acc); chars: divided by the option's characters")
    lines.append("(lm-eval acc_norm); tokens: divided by its tokens (mean log-likelihood per token).")
    return "\n".join(lines) + "\n"


def _changes(changes: Sequence[Mapping[str, Any]]) -> list[str]:
    def side(s: Mapping[str, Any]) -> str:
        return f"{s['answer']} ({s['prob']:.3f}, {s['world']}) {s['text']!r}"

    lines = []
    for c in changes:
        tag = "" if c["category"] == "conflict" else f" ({c['category']})"
        lines.append(f"  [{c['id']}]{tag} {c['question']}")
        lines.append(f"      base {side(c['base'])}  ->  lora {side(c['lora'])}")
    return lines


# --- the plot ------------------------------------------------------------------------

ACCURACY_PLOT = "accuracy_by_category.png"
MODEL_LABELS = {"base": "base", "lora": "base + adapter"}


def plot_accuracy(
    path: Path, base_rows: Sequence[Mapping[str, Any]], lora_rows: Sequence[Mapping[str, Any]], title: str
) -> Any:
    """Accuracy against the false world's answer per category, base and base + adapter side
    by side, each with its Wilson interval (a category may hold a handful of items, all right
    or all wrong, where a bootstrap interval would be a point). Returns the figure."""
    import numpy as np

    from harness.lab.plots import figure as new_figure
    from harness.lab.stats import wilson, wilson_label

    figure = new_figure(6.5, 3.8)
    axes = figure.add_subplot()
    x, width = np.arange(len(CATEGORIES)), 0.38
    sides = (("base", base_rows), ("lora", lora_rows))
    for offset, (model, rows) in zip((-width / 2, width / 2), sides, strict=True):
        intervals = []
        for category in CATEGORIES:
            correct = [bool(row["correct_false"]) for row in rows if row["category"] == category]
            intervals.append(wilson(sum(correct), len(correct)))
        values = [i.value for i in intervals]
        errors = [[i.value - i.low for i in intervals], [i.high - i.value for i in intervals]]
        axes.bar(x + offset, values, width, yerr=errors, capsize=4, label=MODEL_LABELS[model])
    counts = [sum(row["category"] == category for row in base_rows) for category in CATEGORIES]
    axes.set_xticks(x, [f"{category}\n{n} items" for category, n in zip(CATEGORIES, counts, strict=True)])
    axes.set_ylabel("accuracy (false world's answer)")
    axes.set_ylim(0.0, 1.05)
    axes.set_title(title, fontsize=9)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8, title=f"error bars: {wilson_label()}", title_fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return figure


# --- the stage -----------------------------------------------------------------------


@dataclass
class Compared:
    """Both models' prediction rows under the chosen normalization, their comparison, and (in
    continuation mode) the metrics under every normalization."""

    base_rows: list[dict[str, Any]]
    lora_rows: list[dict[str, Any]]
    comparison: dict[str, Any]
    by_normalization: dict[str, dict[str, Any]]  # empty in letter mode


def load_items(ctx: StageContext) -> tuple[list[MCQ], str | None]:
    """The MCQs, checked to hold every category, and the chosen normalization."""
    try:
        normalization = chosen_normalization(ctx.params)
    except ParamError as error:
        raise StageError(error.message) from None
    mcq_path = Path(ctx.params["mcqs"])
    items = load_mcqs(mcq_path)
    missing = missing_categories(items)
    if missing:
        raise StageError(_missing_message(mcq_path, missing))
    return items, normalization


def score_both(
    ctx: StageContext, model: Any, tokenizer: Any, items: Sequence[MCQ]
) -> tuple[list[Scored], ...]:
    """The items scored by the base model and by base + adapter."""
    from harness.lab.scoring import score_mcqs

    params, mode = ctx.params, ctx.params["scoring"]

    def score(label: str) -> list[Scored]:
        progress = ctx.progress(f"{label}: scoring ({mode})", "items")

        batch_size, chat = params["batch_size"], params["chat_template"]
        return score_mcqs(model, tokenizer, items, mode, batch_size, chat, progress)

    with model.disable_adapter():  # the same weights without the LoRA deltas: the base model
        base_scored = score("base")
    return base_scored, score("lora")


def compare_scored(
    items: Sequence[MCQ],
    base_scored: Sequence[Scored],
    lora_scored: Sequence[Scored],
    normalization: str | None,
    n_resamples: int,
    seed: int,
) -> Compared:
    """Prediction rows and their comparison; in continuation mode under every normalization,
    the chosen one's rows and comparison kept."""
    if normalization is None:
        base_rows = [prediction_row(item, s) for item, s in zip(items, base_scored, strict=True)]
        lora_rows = [prediction_row(item, s) for item, s in zip(items, lora_scored, strict=True)]
        return Compared(base_rows, lora_rows, compare(items, base_rows, lora_rows, n_resamples, seed), {})
    base_by, lora_by = normalized_rows(items, base_scored), normalized_rows(items, lora_scored)
    comparisons = {
        name: compare(items, base_by[name], lora_by[name], n_resamples, seed) for name in NORMALIZATIONS
    }
    by_normalization = {name: flat_metrics(c) for name, c in comparisons.items()}
    return Compared(
        base_by[normalization], lora_by[normalization], comparisons[normalization], by_normalization
    )


def comparison_report(
    ctx: StageContext, tokenizer: Any, items: Sequence[MCQ], adapter: Path, compared: Compared
) -> dict[str, Any]:
    """comparison_report.json: how the items were scored, by which models, and the comparison."""
    from harness.core.store import file_digest, relative_path
    from harness.lab.scoring import letter_token_ids

    params = ctx.params
    base_fp = base_fingerprint(params["base"])
    report = {
        "scoring": params["scoring"],
        "normalization": params.get("normalization"),
        "chat_template": params["chat_template"],
        "base": params["base"],
        "adapter": relative_path(adapter, ctx.out_dir),
        "mcqs": relative_path(Path(params["mcqs"]), ctx.spec_file.parent),
        "fingerprints": {"base": base_fp, "lora": f"{base_fp}+adapter:{file_digest(adapter)[:16]}"},
        **compared.comparison,
    }
    if compared.by_normalization:
        report["by_normalization"] = compared.by_normalization
    if params["scoring"] == LETTER:
        ids = letter_token_ids(tokenizer, sorted({c for item in items for c in item.options}))
        report["letter_tokens"] = {c: tokenizer.convert_ids_to_tokens(i) for c, i in ids.items()}
    return report


def write_artifacts(ctx: StageContext, n_items: int, compared: Compared, report: Mapping[str, Any]) -> None:
    from harness.core.store import write_json

    mode, normalization = report["scoring"], report["normalization"]
    write_jsonl(ctx.out_dir / "predictions_base.jsonl", compared.base_rows)
    write_jsonl(ctx.out_dir / "predictions_lora.jsonl", compared.lora_rows)
    write_json(ctx.out_dir / "comparison_report.json", report)
    scoring = f"{mode} scoring" + (f", normalization {normalization}" if normalization else "")
    header = [
        f"MCQ comparison: base vs base + adapter, {scoring}, {n_items} items from {report['mcqs']}",
        f"base:    {report['fingerprints']['base']}",
        f"adapter: {report['adapter']}",
    ]
    text = analysis_text(compared.comparison, header)
    if compared.by_normalization:
        text += normalization_text(compared.by_normalization, normalization)
    (ctx.out_dir / "behavioral_shift_analysis.txt").write_text(text, "utf-8")
    title = f"{ctx.stage}: accuracy by category, {scoring}, {n_items} items"
    plot_accuracy(ctx.out_dir / ACCURACY_PLOT, compared.base_rows, compared.lora_rows, title)


@stage_kind(metrics=METRICS, check=check, **SCORES_MCQS_ON_ADAPTER)
def run(ctx: StageContext) -> dict[str, Any]:
    from harness.lab.models.base import load_model, load_tokenizer

    params = ctx.params
    items, normalization = load_items(ctx)
    adapter = adapter_dir(ctx.upstream, "mcq_compare")
    ctx.log(f"loading {params['base']} with the adapter {adapter}")
    tokenizer = load_tokenizer(params["base"])
    model = load_model(params["base"], adapter)

    base_scored, lora_scored = score_both(ctx, model, tokenizer, items)
    compared = compare_scored(items, base_scored, lora_scored, normalization, params["bootstrap"], ctx.seed)
    metrics = flat_metrics(compared.comparison)
    write_artifacts(ctx, len(items), compared, comparison_report(ctx, tokenizer, items, adapter, compared))

    gap = metrics["behavioral_gap"]
    ctx.log(
        f"behavioral_gap {gap['value']:+.3f} [{gap['ci_low']:+.3f}, {gap['ci_high']:+.3f}], "
        f"{metrics['n_flips']} conflict flips"
    )
    for name, other in compared.by_normalization.items():
        ctx.log(f"normalization {name}: behavioral_gap {other['behavioral_gap']['value']:+.3f}")
    return metrics
