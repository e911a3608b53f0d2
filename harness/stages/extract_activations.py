"""`extract_activations`: the residual stream at each statement's decision token (its last
token), at every layer, from one forward pass per batch.

The model is `base`, plus the adapter `<upstream dir>/adapter/` of the upstream stage with
role `adapter` (or of the only upstream) when `use_adapter` is true (the default); with
`use_adapter: false` it is the base model alone and no upstream is needed. Artifacts (the
layout of `harness.lab.activations`, which the stages that read them use):

    layer_{i:02d}.safetensors   tensor `activations` [n_items, d_model] float32 per layer
                                index: 0 embeddings, i the output of block i-1, all raw
                                residual streams (the last one before the final norm)
    metadata.jsonl              id, text, category, labels per item, in file order
    layer_convention.json       n_layers, each index's name, the position, model, adapter
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.api import stage_kind
from harness.core.stage import ParamError, StageContext, StageError
from harness.core.upstream import adapter_dir, adapter_role
from harness.lab.activations import load_statements
from harness.lab.models.base import base_fingerprint

METRICS = ("n_items", "n_layers", "d_model", "mb_written")


def check(params: Mapping[str, Any], spec_dir: Path) -> None:
    path = (spec_dir / params["statements"]).resolve()
    if not path.is_file():
        raise ParamError(
            ("statements",), f"statements file not found: {params['statements']} (looked for {path})"
        )
    try:
        load_statements(path)
    except StageError as error:
        raise ParamError(("statements",), str(error)) from None


@stage_kind(
    needs=lambda params: (adapter_role(),) if params["use_adapter"] else (),
    metrics=METRICS,
    input_params=("statements",),
    transport_params=("batch_size",),
    check=check,
)
def run(ctx: StageContext) -> dict[str, Any]:
    from harness.lab.activations import extract_to_dir, megabytes
    from harness.lab.models.base import load_model, load_tokenizer

    params = ctx.params
    base, path = params["base"], Path(params["statements"])
    statements = load_statements(path)
    adapter = adapter_dir(ctx.upstream, "extract_activations") if params["use_adapter"] else None

    ctx.log(f"loading {base}" + (f" with the adapter {adapter}" if adapter else " (no adapter)"))
    tokenizer = load_tokenizer(base)
    model = load_model(base, adapter)

    progress = ctx.progress("extracting", "statements")

    extracted = extract_to_dir(
        model,
        tokenizer,
        statements,
        ctx.out_dir,
        params["batch_size"],
        model_name=base_fingerprint(base),
        adapter=adapter,
        progress=progress,
    )
    metrics = {
        "n_items": extracted.n_items,
        "n_layers": extracted.n_layers,
        "d_model": extracted.d_model,
        "mb_written": megabytes(extracted.bytes_written),
    }
    ctx.log(
        f"{extracted.n_items} items x {extracted.n_layers} layers x {extracted.d_model} dims, "
        f"{metrics['mb_written']} MB"
    )
    return metrics
