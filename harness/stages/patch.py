"""`patch`: where does the finetune's change of answer live? Single-token activation patching
between the base model and base + adapter on the conflict MCQs, as token contrasts.

The adapter is `<dir>/adapter/` of the upstream stage in role `adapter` (or of the only
upstream stage). For every item, LD = logit(true answer's token) - logit(false answer's
token) at the decision token, measured in four kinds of run:

    LD_base, LD_lora      the clean runs (adapter disabled / enabled)
    forward  (recovery)   the finetuned run with the base run's residual at one
                          (hidden_states index, position) put in:
                          fraction = (LD_patched - LD_lora) / (LD_base - LD_lora)
    reverse  (sufficiency) the base run with the finetuned residual put in:
                          fraction = (LD_patched - LD_base) / (LD_lora - LD_base)

1 means that one activation carries the whole difference, 0 that it carries none. Over the
items, a cell's recovery is the ratio of sums: the LD moved toward the other run, each item
counted in the direction of its own difference, summed, over the summed |LD_base - LD_lora|
(the per-item fractions weighted by each item's difference). A mean of per-item fractions
lets an item whose runs barely differ dominate: moving 0.5 of a 0.011 difference is 45.45.
Items whose clean runs differ by less than 1e-3 have no difference to recover: they are
skipped and counted (`n_skipped`). Positions are the last `positions` prompt tokens, written
as offsets from the decision token (0, -1, -2, ...); hidden_states indices follow
`harness.lab.hooks` (0: embeddings, i: block i-1's output, raw).

At the last index the decision token's residual alone makes its logits, so patching it there
recovers exactly 1 by construction: the most recovered cell says nothing. The informative
quantity is how early the decision token's residual carries the difference:
`earliest_recovering_layer`, the first index whose forward patch at the decision token
recovers at least `recovered_threshold` (default 0.8) of it; the later blocks' adapted
computation adds less than the rest. Metrics: that index, `recovered_at_decision_by_layer`
(the forward recovery at the decision token per index), `n_items` (conflict items used),
`n_skipped`. Artifacts:

    patching.json          per index, offset and item the fractions of both directions, the
                           recovery per (index, offset), each item's clean LDs and tokens at
                           the patched positions
    patching_heatmap.png   recovery per (index, offset), forward and reverse side by side
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.api import stage_kind
from harness.core.stage import StageContext
from harness.core.upstream import adapter_dir
from harness.lab.activations import LAYER_AXIS, layer_tick
from harness.lab.checks import SCORES_MCQS_ON_ADAPTER, mcqs_param
from harness.lab.mcq import load_mcqs
from harness.lab.plots import figure as new_figure

MIN_CHANGE = 1e-3  # |LD_base - LD_lora| below this: nothing to recover, the item is skipped
METRICS = ("earliest_recovering_layer", "recovered_at_decision_by_layer", "n_items", "n_skipped")
DIRECTIONS = {
    "forward": "base activation patched into the finetuned run: fraction of LD_base - LD_lora recovered",
    "reverse": "finetuned activation patched into the base run: fraction of LD_lora - LD_base reproduced",
}


# --- collection ----------------------------------------------------------------------


# --- fractions (pure) ----------------------------------------------------------------


def fractions(
    patched: np.ndarray, source: np.ndarray, target: np.ndarray, min_change: float = MIN_CHANGE
) -> tuple[np.ndarray, np.ndarray]:
    """Per-item fractions (patched - target) / (source - target), shape of `patched`
    ([..., n_items]; NaN where a cell was not measured), and the mask of items used: those
    with |source - target| >= min_change (the others are NaN everywhere)."""
    change = source - target
    used = np.abs(change) >= min_change
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (patched - target) / np.where(used, change, np.nan)
    return out, used


def recovered(
    patched: np.ndarray, source: np.ndarray, target: np.ndarray, min_change: float = MIN_CHANGE
) -> np.ndarray:
    """Per cell (`patched` without its last, items axis) the share of the items' summed
    difference that patching moves: sum of sign(source - target) * (patched - target) over
    sum of |source - target|, over the used items measured in that cell; NaN where none is."""
    per_item, used = fractions(patched, source, target, min_change)
    weight = np.where(np.isnan(per_item), 0.0, np.abs(source - target) * used)
    total = weight.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, np.nansum(per_item * weight, axis=-1) / total, np.nan)


def _number(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def _matrix(a: np.ndarray) -> list:
    return [_matrix(row) for row in a] if a.ndim > 1 else [_number(x) for x in a]


def summary_metrics(forward: np.ndarray, threshold: float, n_items: int, n_skipped: int) -> dict[str, Any]:
    """Metrics from the forward recovery [index, offset]: the first index whose recovery at
    the decision token (offset 0) reaches `threshold`; None where nothing was measurable."""
    at_decision = forward[:, 0]
    reaching = np.flatnonzero(at_decision >= threshold)  # NaN compares False
    return {
        "earliest_recovering_layer": int(reaching[0]) if reaching.size else None,
        "recovered_at_decision_by_layer": _matrix(at_decision),
        "n_items": n_items,
        "n_skipped": n_skipped,
    }


# --- the model work ------------------------------------------------------------------


def plot_recovery(recovery: Mapping[str, np.ndarray], path: Path, title: str) -> Any:
    """Recovery per (layer, offset), one panel per direction, layers upward from the embeddings
    as on the logit lens's heatmap. Returns the figure."""
    n_indices, n_offsets = next(iter(recovery.values())).shape
    figure = new_figure(3 + 1.2 * n_offsets * len(recovery), 1.5 + 0.35 * n_indices)
    axes = figure.subplots(1, len(recovery), squeeze=False)[0]
    for ax, (name, matrix) in zip(axes, recovery.items(), strict=True):
        masked = np.ma.masked_invalid(matrix)
        image = ax.imshow(masked, cmap="RdBu", vmin=-1, vmax=1, aspect="auto", origin="lower")
        for (i, k), value in np.ndenumerate(matrix):
            if not math.isnan(value):
                color = "white" if abs(value) > 0.6 else "black"  # readable on dark cells
                ax.text(k, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color)
        ax.set_xticks(range(n_offsets), [str(-k) if k else "0 (decision)" for k in range(n_offsets)])
        ax.set_yticks(range(n_indices), [layer_tick(i) for i in range(n_indices)])
        ax.set_xlabel("position (offset from the decision token)")
        ax.set_title(
            {"forward": "base -> finetuned: recovered", "reverse": "finetuned -> base: reproduced"}[name]
        )
    axes[0].set_ylabel(LAYER_AXIS)
    figure.colorbar(image, ax=list(axes), shrink=0.8, label="fraction of the summed logit difference")
    figure.suptitle(title, fontsize=9, y=1.02)
    figure.savefig(path, bbox_inches="tight")
    return figure


def check(params: Mapping[str, Any], spec_dir: Path) -> None:
    mcqs_param(params, spec_dir, conflict_for="patching")


@dataclass(frozen=True)
class PatchSetup:
    """The base model with the adapter, its conflict items and the cells to patch."""

    adapter: Path
    tokenizer: Any
    model: Any
    items: list[Any]  # the conflict MCQs as token contrasts
    indices: list[int]  # hidden_states indices
    n_offsets: int  # prompt positions patched, back from the decision token
    batch_size: int

    def runs(self) -> dict[str, Any]:
        """The two clean runs, each as the context that puts the model in its mode."""
        return {"base": self.model.disable_adapter, "lora": nullcontext}


def _load_setup(ctx: StageContext) -> PatchSetup:
    """Load the base model with the upstream adapter and the conflict items as token contrasts."""
    from harness.lab.contrast import contrasts
    from harness.lab.hooks import n_indices
    from harness.lab.models.base import load_model, load_tokenizer

    params = ctx.params
    base = params["base"]
    adapter = adapter_dir(ctx.upstream, "patch")
    ctx.log(f"loading {base} with the adapter {adapter}")
    tokenizer = load_tokenizer(base)
    model = load_model(base, adapter)
    items = contrasts(tokenizer, load_mcqs(Path(params["mcqs"])), params["scoring"], params["chat_template"])
    indices = list(range(n_indices(model)))
    return PatchSetup(adapter, tokenizer, model, items, indices, params["positions"], params["batch_size"])


def _clean_runs(setup: PatchSetup) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Per clean run, the residual at every index and patched position [item, index, offset, d]
    (zeros where the prompt is too short to have that position; those cells are never
    patched), and the LD per item."""
    import torch

    from harness.lab.hooks import contrast_logit_diffs, record_residuals

    model, tokenizer, items, batch_size = setup.model, setup.tokenizer, setup.items, setup.batch_size
    indices, n_offsets, runs = setup.indices, setup.n_offsets, setup.runs()
    acts = {name: torch.zeros(len(items), len(indices), n_offsets, model.config.hidden_size) for name in runs}
    clean: dict[str, np.ndarray] = {}
    for name, mode_of in runs.items():

        @contextmanager
        def keep(rows: list[int], last: torch.Tensor, name: str = name) -> Any:
            with record_residuals(model, indices) as recorded:
                yield
            for i in indices:
                states = recorded[i]  # gathered where it lives: only [rows, d] goes to the CPU
                batch_rows = torch.arange(len(rows), device=states.device)
                for k in range(n_offsets):
                    at = states[batch_rows, (last - k).clamp(min=0).to(states.device)]
                    acts[name][rows, i, k] = at.float().cpu()

        with mode_of():
            clean[name] = contrast_logit_diffs(model, tokenizer, items, batch_size, keep).numpy()
    return acts, clean


def _patched_runs(ctx: StageContext, setup: PatchSetup, acts: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Per direction, the LD with one (index, offset) patched from the other run
    [index, offset, item]; NaN where the prompt is too short to have that position."""
    import torch

    from harness.lab.hooks import contrast_logit_diffs, patch_residual

    model, tokenizer, items, batch_size = setup.model, setup.tokenizer, setup.items, setup.batch_size
    indices, n_offsets, runs = setup.indices, setup.n_offsets, setup.runs()
    lengths = np.array([len(c.prompt_ids) for c in items])
    patched = {d: np.full((len(indices), n_offsets, len(items)), np.nan) for d in DIRECTIONS}
    for direction, (run_in, source) in {"forward": ("lora", "base"), "reverse": ("base", "lora")}.items():
        for i in indices:
            for k in range(n_offsets):

                def patching(
                    rows: list[int], last: torch.Tensor, i: int = i, k: int = k, source: str = source
                ) -> Any:
                    positions = torch.where(last - k >= 0, last - k, -1)  # -1: not patched
                    return patch_residual(model, i, positions, acts[source][rows, i, k])

                with runs[run_in]():
                    ld = contrast_logit_diffs(model, tokenizer, items, batch_size, patching).numpy()
                patched[direction][i, k] = np.where(lengths > k, ld, np.nan)
        ctx.log(f"{direction} patching: {len(indices)} indices x {n_offsets} positions done")
    return patched


def _item_rows(setup: PatchSetup, used: np.ndarray, clean: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """Per item: whether it was used, its clean LDs, and its tokens at the patched positions."""
    tokens = setup.tokenizer.convert_ids_to_tokens
    rows = []
    for c, used_item, ld_base, ld_lora in zip(setup.items, used, clean["base"], clean["lora"], strict=True):
        ids = c.prompt_ids[-setup.n_offsets :][::-1]  # offsets 0, -1, ...
        rows.append(
            {
                "id": c.item.id,
                "used": bool(used_item),
                "ld_base": float(ld_base),
                "ld_lora": float(ld_lora),
                "tokens": tokens(list(ids)),
                "true_token": tokens(c.true_id),
                "false_token": tokens(c.false_id),
            }
        )
    return rows


def _write_artifacts(
    ctx: StageContext,
    setup: PatchSetup,
    rows: list[dict[str, Any]],
    recovery: Mapping[str, np.ndarray],
    per_item: Mapping[str, np.ndarray],
    metrics: dict[str, Any],
) -> None:
    """patching.json and patching_heatmap.png."""
    from harness.core.store import relative_path, write_json

    params, n_used = ctx.params, metrics["n_items"]
    write_json(
        ctx.out_dir / "patching.json",
        {
            "base": params["base"],
            "adapter": relative_path(setup.adapter, ctx.out_dir),
            "mcqs": relative_path(params["mcqs"], ctx.spec_file.parent),
            "scoring": params["scoring"],
            "indices": setup.indices,
            "offsets": [-k for k in range(setup.n_offsets)],
            "min_change": MIN_CHANGE,
            "recovered_threshold": params["recovered_threshold"],
            "n_items": n_used,
            "n_skipped": metrics["n_skipped"],
            "items": rows,
            **{
                d: {
                    "description": DIRECTIONS[d],
                    "recovered": _matrix(recovery[d]),
                    "per_item": _matrix(per_item[d]),
                }
                for d in DIRECTIONS
            },
            "metrics": metrics,
        },
    )
    title = f"{ctx.stage}: {n_used} conflict items ({params['scoring']})"
    plot_recovery(recovery, ctx.out_dir / "patching_heatmap.png", title)


@stage_kind(metrics=METRICS, check=check, **SCORES_MCQS_ON_ADAPTER)
def run(ctx: StageContext) -> dict[str, Any]:
    setup = _load_setup(ctx)
    acts, clean = _clean_runs(setup)
    ctx.log(f"clean runs: mean LD base {clean['base'].mean():+.3f}, finetuned {clean['lora'].mean():+.3f}")
    patched = _patched_runs(ctx, setup, acts)

    threshold = ctx.params["recovered_threshold"]
    ends = {"forward": (clean["base"], clean["lora"]), "reverse": (clean["lora"], clean["base"])}
    per_item = {d: fractions(patched[d], *ends[d])[0] for d in DIRECTIONS}
    recovery = {d: recovered(patched[d], *ends[d]) for d in DIRECTIONS}
    used = np.abs(clean["base"] - clean["lora"]) >= MIN_CHANGE
    n_used = int(used.sum())
    if not n_used:
        ctx.log(f"no item's LD changed by {MIN_CHANGE} or more between base and finetuned: nothing to patch")
    metrics = summary_metrics(recovery["forward"], threshold, n_used, len(setup.items) - n_used)

    _write_artifacts(ctx, setup, _item_rows(setup, used, clean), recovery, per_item, metrics)
    if n_used:
        ctx.log(
            f"the decision token's residual recovers {threshold} of the difference from index "
            f"{metrics['earliest_recovering_layer']} on (by index: "
            + ", ".join(f"{r:.2f}" for r in recovery["forward"][:, 0])
            + ")"
        )
    return metrics
