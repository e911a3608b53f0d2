"""`logit_lens`: at which layer does the finetuned model start preferring the false answer?

For every conflict MCQ, as a token contrast (`harness.lab.contrast`: a prompt whose last token
is the decision position, and the next token of the true and of the false answer), the
residual stream at the decision position after the embeddings and after every block is
read through the model's own final norm and unembedding (TransformerLens's
`logit_readout`, recomputing the norm's statistics for each layer), once for the base
model and once for base + the upstream adapter merged into its weights.

Layer k of a trajectory is the residual stream entering block k: layer 0 is the token
embedding, layer k >= 1 the output of block k - 1, and the last layer (n_blocks) the
output of the last block, where the lens reproduces the model's own logits (checked).

Artifacts:

    trajectories_base.jsonl, trajectories_lora.jsonl   one row per conflict item, in file
        order: id, question, prompt (the decoded prompt ids), true/false answer letters,
        true/false token (text and id), and per layer: true_logit, false_logit,
        logit_diff (true - false), true_prob, false_prob (softmax over the full vocabulary)
    logit_lens_summary.json       per model the mean of each quantity per layer, the final
                                  logit diff, the flip layer, the false-preference rate;
                                  the layer labels (index k, "0 emb" for the embeddings, as
                                  in every kind's plots) and the items that flipped
    logit_lens_heatmap.png        logit diff, layers x items, base and lora side by side
    mean_logit_diff.png           mean logit diff per layer, base and lora

Metrics: `{base,lora}_final_logit_diff` (mean over items at the last layer; > 0: the true
answer is preferred), `{base,lora}_flip_layer` (the first layer from which the mean logit
diff stays below -`flip_margin` (default 1 logit: the false token at least e times as likely
as the true one) up to the last layer, that is where the preference for the false answer the
model ends with sets in; -1 if the last layer does not prefer it by more than the margin;
the same rule for both models, see `flip_layer`; the summary also records
`first_negative_layer`, the first layer whose mean diff is < 0),
`{base,lora}_false_preference_rate` (fraction of items whose last-layer diff is < 0),
`n_items` (conflict items).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.api import stage_kind
from harness.core.stage import StageContext
from harness.core.store import relative_path, write_json, write_jsonl
from harness.core.upstream import adapter_dir
from harness.lab.activations import LAYER_AXIS, layer_tick
from harness.lab.checks import SCORES_MCQS_ON_ADAPTER, mcqs_param
from harness.lab.mcq import load_mcqs
from harness.lab.models.base import base_fingerprint
from harness.lab.plots import figure as new_figure

if TYPE_CHECKING:
    from harness.lab.contrast import Contrast

MODELS = ("base", "lora")
QUANTITIES = ("true_logit", "false_logit", "logit_diff", "true_prob", "false_prob")
NEVER = -1  # flip layer when no layer prefers the false answer on average
METRICS = (
    *(f"{model}_{name}" for model in MODELS for name in ("final_logit_diff", "flip_layer")),
    *(f"{model}_false_preference_rate" for model in MODELS),
    "n_items",
)
# The last layer's lens must reproduce the model's logits: the same ops on the same vector,
# so only kernel rounding differs (~1e-6 in fp32); the bound leaves room for GPU kernels.
FINAL_LAYER_ATOL, FINAL_LAYER_RTOL = 1e-3, 1e-4

Progress = Callable[[int, int], None]


# --- collection ----------------------------------------------------------------------


# --- the lens (torch, TransformerLens) ------------------------------------------------


@dataclass(frozen=True)
class Trajectory:
    """One item's readout per layer (layer 0: embeddings; k: output of block k - 1)."""

    true_logit: list[float]
    false_logit: list[float]
    true_prob: list[float]
    false_prob: list[float]
    final_deviation: float  # max |lens logit - model logit| over the vocabulary, last layer

    @property
    def logit_diff(self) -> list[float]:
        return [t - f for t, f in zip(self.true_logit, self.false_logit, strict=True)]


def layer_labels(n_blocks: int) -> list[str]:
    """The layers' names on the plots' axes, as every kind names them (harness.lab.activations)."""
    return [layer_tick(index) for index in range(n_blocks + 1)]


def residual_hooks(n_blocks: int) -> list[str]:
    """The hooks `ActivationCache.accumulated_resid` reads: every block's input, and the
    last block's output."""
    return [
        *(f"blocks.{k}.hook_resid_pre" for k in range(n_blocks)),
        f"blocks.{n_blocks - 1}.hook_resid_post",
    ]


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar length (less padding), longest first."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def lens_trajectories(
    bridge: Any,
    tokenizer: Any,
    contrasts: Sequence[Contrast],
    batch_size: int = 8,
    progress: Progress | None = None,
) -> list[Trajectory]:
    """The logit lens at each contrast's decision token, through `bridge` (a TransformerLens
    TransformerBridge). Batches are right-padded: causal attention keeps a row's real
    positions unaffected by the pads after them, so results do not depend on batch_size."""
    import torch
    from transformer_lens.tools.analysis.logit_lens import logit_readout

    from harness.lab.scoring import last_token_indices, right_pad

    n_blocks = int(bridge.cfg.n_layers)
    device = torch.device(bridge.cfg.device)
    out: list[Trajectory | None] = [None] * len(contrasts)
    done = 0
    with torch.no_grad():
        for batch in _batches([len(c.prompt_ids) for c in contrasts], batch_size):
            sequences = [contrasts[i].prompt_ids for i in batch]
            input_ids, mask = right_pad(tokenizer, sequences)
            last = last_token_indices(input_ids, mask, sequences).to(device)
            logits, cache = bridge.run_with_cache(
                input_ids.to(device), attention_mask=mask.to(device), names_filter=residual_hooks(n_blocks)
            )
            stack = cache.accumulated_resid(apply_ln=False)  # [n_blocks + 1, batch, pos, d_model]
            rows = torch.arange(len(batch), device=device)
            at_decision = stack[:, rows, last]  # [n_blocks + 1, batch, d_model]
            # the real ln_final (statistics recomputed per layer), W_U, b_U, output transform
            lens = logit_readout(bridge, at_decision, apply_ln=True).values.float()
            model_logits = logits[rows, last].float()
            deviation = (lens[-1] - model_logits).abs().amax(dim=-1)
            allowed = FINAL_LAYER_ATOL + FINAL_LAYER_RTOL * model_logits.abs().amax(dim=-1)
            if bool((deviation > allowed).any()):
                raise RuntimeError(
                    f"the logit lens at the last layer differs from the model's own logits by "
                    f"{float(deviation.max()):.3g}: the bridge's readout is not ln_final -> unembed "
                    "on the last block's output"
                )
            probs = torch.softmax(lens, dim=-1)
            true_ids = torch.tensor([contrasts[i].true_id for i in batch], device=device)
            false_ids = torch.tensor([contrasts[i].false_id for i in batch], device=device)

            # [layers, batch, vocab] -> per row its own token's value: [batch, layers]
            picked = [
                values[:, rows, ids].T.double().cpu()
                for values, ids in (
                    (lens, true_ids),
                    (lens, false_ids),
                    (probs, true_ids),
                    (probs, false_ids),
                )
            ]
            for row, index in enumerate(batch):
                out[index] = Trajectory(*(p[row].tolist() for p in picked), float(deviation[row]))
            done += len(batch)
            if progress:
                progress(done, len(contrasts))
    return [t for t in out if t is not None]


# --- rows and their aggregation (pure: no model) -------------------------------------


def trajectory_row(contrast: Contrast, trajectory: Trajectory, tokenizer: Any) -> dict[str, Any]:
    item = contrast.item
    return {
        "id": item.id,
        "question": item.question,
        "prompt": tokenizer.decode(list(contrast.prompt_ids)),
        "true_answer": item.true_answer,
        "false_answer": item.false_answer,
        "true_token": tokenizer.decode([contrast.true_id]),
        "false_token": tokenizer.decode([contrast.false_id]),
        "true_token_id": contrast.true_id,
        "false_token_id": contrast.false_id,
        "true_logit": trajectory.true_logit,
        "false_logit": trajectory.false_logit,
        "logit_diff": trajectory.logit_diff,
        "true_prob": trajectory.true_prob,
        "false_prob": trajectory.false_prob,
    }


def mean_per_layer(rows: Sequence[Mapping[str, Any]], quantity: str) -> list[float]:
    if not rows:
        raise ValueError("no trajectories to average")
    columns = zip(*(row[quantity] for row in rows), strict=True)
    return [float(sum(column) / len(rows)) for column in columns]


def flip_layer(mean_diff: Sequence[float], margin: float) -> int:
    """The first layer from which the mean logit diff (true - false) is below -`margin` at
    every layer up to the last: where the preference for the false answer that the model
    ends with sets in. NEVER (-1) when the last layer does not prefer the false answer by
    more than the margin.

    Not merely the first negative layer, nor a mere sign: readouts of the embeddings (layer
    0) and of early blocks often sit just below zero for both models (in the tiny world,
    layer 0 is the same token embedding read through the tied unembedding, with or without
    the adapter), and [-0.2, -0.01, -0.01, -0.01, -5.1] changes at the last block, not at
    the first. For the same reason the flip is never put at layer 0: when every layer is
    beyond the margin, the preference sets in with the first block (layer 1), the first
    computation the readout sees."""
    if margin < 0:
        raise ValueError(f"the flip margin is a distance from zero, not {margin}")
    if not mean_diff or mean_diff[-1] >= -margin:
        return NEVER
    layer = len(mean_diff) - 1
    while layer > 1 and mean_diff[layer - 1] < -margin:
        layer -= 1
    return layer


def first_negative_layer(mean_diff: Sequence[float]) -> int:
    """The first layer whose mean logit diff is < 0, or NEVER (-1); recorded in the summary."""
    return next((layer for layer, diff in enumerate(mean_diff) if diff < 0), NEVER)


def false_preference_rate(rows: Sequence[Mapping[str, Any]]) -> float:
    """Fraction of items whose last-layer logit diff is < 0 (the model's own preference)."""
    return sum(row["logit_diff"][-1] < 0 for row in rows) / len(rows)


def model_summary(rows: Sequence[Mapping[str, Any]], flip_margin: float) -> dict[str, Any]:
    means = {f"mean_{q}": mean_per_layer(rows, q) for q in QUANTITIES}
    return {
        **means,
        "final_logit_diff": means["mean_logit_diff"][-1],
        "flip_layer": flip_layer(means["mean_logit_diff"], flip_margin),
        "first_negative_layer": first_negative_layer(means["mean_logit_diff"]),
        "false_preference_rate": false_preference_rate(rows),
    }


def summarize(
    base_rows: Sequence[Mapping[str, Any]],
    lora_rows: Sequence[Mapping[str, Any]],
    labels: Sequence[str],
    flip_margin: float,
) -> dict[str, Any]:
    """Both models' per-layer means, their flip layers (one margin for both) and the items
    whose final preference changed."""
    if [r["id"] for r in base_rows] != [r["id"] for r in lora_rows]:
        raise ValueError("base and lora trajectories must follow the same items, in order")
    for rows in (base_rows, lora_rows):
        if any(len(row["logit_diff"]) != len(labels) for row in rows):
            raise ValueError(f"every trajectory has one value per layer ({len(labels)})")

    def changed(to_false: bool) -> list[str]:  # the last layer's preference changed sides
        return [
            base["id"]
            for base, lora in zip(base_rows, lora_rows, strict=True)
            if (base["logit_diff"][-1] < 0) != to_false and (lora["logit_diff"][-1] < 0) == to_false
        ]

    return {
        "n_items": len(base_rows),
        "layers": list(labels),
        "layer_convention": "layer 0: token embeddings; layer k >= 1: output of block k-1 (residual stream)",
        "flip_margin": flip_margin,
        "flip_layer_rule": (
            f"first layer (never the embeddings) from which the mean logit diff (true - false) is "
            f"< -{flip_margin} at every later layer; -1 if the last layer's is >= -{flip_margin}"
        ),
        "models": {
            "base": model_summary(base_rows, flip_margin),
            "lora": model_summary(lora_rows, flip_margin),
        },
        "items_flipped_to_false": changed(to_false=True),
        "items_flipped_to_true": changed(to_false=False),
    }


def flat_metrics(summary: Mapping[str, Any]) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for model in MODELS:
        s = summary["models"][model]
        metrics[f"{model}_final_logit_diff"] = s["final_logit_diff"]
        metrics[f"{model}_flip_layer"] = s["flip_layer"]
        metrics[f"{model}_false_preference_rate"] = s["false_preference_rate"]
    metrics["n_items"] = summary["n_items"]
    return metrics


# --- plots ---------------------------------------------------------------------------


def plot_heatmap(
    path: Path,
    base_rows: Sequence[Mapping[str, Any]],
    lora_rows: Sequence[Mapping[str, Any]],
    labels: Sequence[str],
) -> Any:
    """Logit diff, layers (rows, embeddings at the bottom) x items, one panel per model, on
    one diverging scale centered at 0: blue prefers the true answer, red the false one."""
    import numpy as np

    grids = [np.array([row["logit_diff"] for row in rows]).T for rows in (base_rows, lora_rows)]
    limit = max(float(np.abs(g).max()) for g in grids) or 1.0
    n_items = len(base_rows)
    figure = new_figure(min(4 + 0.5 * n_items, 24), 1.5 + 0.35 * len(labels) + 1.5)
    axes = figure.subplots(1, 2, sharey=True)
    for ax, grid, model in zip(axes, grids, MODELS, strict=True):
        image = ax.imshow(grid, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto", origin="lower")
        ax.set_title(f"{model}: logit(true) - logit(false)", fontsize=9)
        ax.set_xticks(range(n_items), [row["id"] for row in base_rows], rotation=90, fontsize=6)
        ax.set_xlabel("item")
    axes[0].set_yticks(range(len(labels)), list(labels), fontsize=7)
    axes[0].set_ylabel(LAYER_AXIS)
    figure.colorbar(image, ax=list(axes), shrink=0.8, label="logit diff (> 0: true answer)")
    figure.savefig(path, bbox_inches="tight")
    return figure


def plot_mean(path: Path, summary: Mapping[str, Any]) -> Any:
    labels = summary["layers"]
    figure = new_figure(6, 3.5)
    ax = figure.add_subplot()
    for model in MODELS:
        ax.plot(range(len(labels)), summary["models"][model]["mean_logit_diff"], marker=".", label=model)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel(LAYER_AXIS)
    ax.set_ylabel("mean logit(true) - logit(false)")
    ax.set_title(f"logit lens at the decision token, {summary['n_items']} conflict items", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    return figure


# --- the stage -----------------------------------------------------------------------


def check(params: Mapping[str, Any], spec_dir: Path) -> None:
    mcqs_param(params, spec_dir, conflict_for="the logit lens")


@stage_kind(metrics=METRICS, check=check, **SCORES_MCQS_ON_ADAPTER)
def run(ctx: StageContext) -> dict[str, Any]:
    import gc

    from harness.core.store import file_digest
    from harness.lab.contrast import contrasts as make_contrasts
    from harness.lab.models.base import load_tokenizer
    from harness.lab.models.lens import load_bridge

    params = ctx.params
    base, mode, mcq_path = params["base"], params["scoring"], Path(params["mcqs"])
    adapter = adapter_dir(ctx.upstream, "logit_lens")
    tokenizer = load_tokenizer(base)
    contrasts = make_contrasts(tokenizer, load_mcqs(mcq_path), mode, params["chat_template"])

    def trajectories(label: str, with_adapter: Path | None) -> tuple[list[dict[str, Any]], int]:
        ctx.log(f"{label}: loading {base}" + (f" with the adapter {adapter} merged" if with_adapter else ""))
        bridge = load_bridge(base, with_adapter)
        progress = ctx.progress(f"{label}: logit lens ({mode})", "conflict items")
        found = lens_trajectories(bridge, tokenizer, contrasts, params["batch_size"], progress)
        n_blocks = int(bridge.cfg.n_layers)
        del bridge  # one model in memory at a time: an 8B model in fp32 is 32 GB
        gc.collect()
        _empty_cuda_cache()
        return [trajectory_row(c, t, tokenizer) for c, t in zip(contrasts, found, strict=True)], n_blocks

    base_rows, n_blocks = trajectories("base", None)
    lora_rows, _ = trajectories("lora", adapter)
    labels = layer_labels(n_blocks)
    summary = summarize(base_rows, lora_rows, labels, params["flip_margin"])
    base_fp = base_fingerprint(base)
    summary.update(
        scoring=mode,
        chat_template=params["chat_template"],
        base=base,
        adapter=relative_path(adapter, ctx.out_dir),
        mcqs=relative_path(mcq_path, ctx.spec_file.parent),
        fingerprints={"base": base_fp, "lora": f"{base_fp}+adapter:{file_digest(adapter)[:16]}"},
    )
    write_jsonl(ctx.out_dir / "trajectories_base.jsonl", base_rows)
    write_jsonl(ctx.out_dir / "trajectories_lora.jsonl", lora_rows)
    write_json(ctx.out_dir / "logit_lens_summary.json", summary)
    plot_heatmap(ctx.out_dir / "logit_lens_heatmap.png", base_rows, lora_rows, labels)
    plot_mean(ctx.out_dir / "mean_logit_diff.png", summary)
    metrics = flat_metrics(summary)
    ctx.log(
        f"final logit diff base {metrics['base_final_logit_diff']:+.3f}, "
        f"lora {metrics['lora_final_logit_diff']:+.3f}; lora flip layer {metrics['lora_flip_layer']}, "
        f"false preference {metrics['lora_false_preference_rate']:.2f}"
    )
    return metrics


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
