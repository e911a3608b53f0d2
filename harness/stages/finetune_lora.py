"""`finetune_lora`: continued pretraining of a base model with a LoRA adapter (peft).

Next-token prediction on whole documents (not SFT on question/answer pairs): documents
from the upstream stage's `docs.jsonl` (or the `docs` param when there is no upstream) are
tokenized, each followed by EOS, and packed into full blocks (or padded one per row), then
a LoRA adapter is trained on them with `harness.training.train`.

Artifacts in the stage directory:
    adapter/               the adapter alone (`PeftModel.from_pretrained(base, path)` loads it)
    checkpoints/step-N/    the adapter every `checkpoint_every` optimizer steps, when asked
    loss.jsonl             one row per optimizer step: step, loss, lr, grad_norm, tokens_seen
    loss.png               the loss curve
    train_metadata.json    base, its fingerprint, parameter and token counts, device, timings
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.checks import base_code_version, check_base_param
from harness.models import base_fingerprint
from harness.plots import figure as new_figure
from harness.spec.validate import SPECS_DIR, with_defaults
from harness.stage import StageContext, StageError, StageKind

if TYPE_CHECKING:
    from harness.training import Sequences, StepRecord

VERSION = "1"  # bump when the outputs change for the same inputs
SCHEMA = SPECS_DIR / "stages" / "finetune_lora.schema.json"
METRICS = (
    "initial_loss",
    "final_loss",
    "loss_drop",
    "n_tokens",
    "n_steps",
    "trainable_params",
    "tokens_per_second",
    "loss_curve",
)
DOCS_FILE = "docs.jsonl"
DOCS_ROLE = "docs"
MAX_REPORTED_ROWS = 3


# --- params ----------------------------------------------------------------------------------


def settings(params: Mapping[str, Any]) -> dict[str, Any]:
    """The params with every default filled in."""
    return with_defaults(dict(params), SCHEMA)


def check(params: Mapping[str, Any], spec_dir: Path) -> None:
    """At collection: a base model missing here fails in seconds, not after loading data."""
    check_base_param(params)


# --- documents -------------------------------------------------------------------------------


def docs_file(ctx: StageContext) -> Path:
    """The jsonl the documents come from: the upstream's docs.jsonl, else the `docs` param."""
    given = ctx.params.get("docs")
    if ctx.upstream:
        if given:
            raise StageError(
                f"stage {ctx.stage!r} has both an upstream stage and a `docs` file; "
                "keep one: `needs` to train on a stage's docs.jsonl, or `docs` for a file"
            )
        if DOCS_ROLE in ctx.upstream:
            upstream = ctx.upstream[DOCS_ROLE]
        elif len(ctx.upstream) == 1:
            upstream = next(iter(ctx.upstream.values()))
        else:
            roles = ", ".join(sorted(ctx.upstream))
            raise StageError(
                f"stage {ctx.stage!r} needs several stages ({roles}); name the one whose docs.jsonl "
                f"to train on with the role `docs`: `needs: {{docs: <stage>, ...}}`"
            )
        path = upstream.dir / DOCS_FILE
        if not path.is_file():
            raise StageError(
                f"upstream stage {upstream.name!r} (kind {upstream.kind}) wrote no {DOCS_FILE} "
                f"in {upstream.dir}; finetune_lora trains on the documents of a stage that writes one"
            )
        return path
    if not given:
        raise StageError(
            f"stage {ctx.stage!r} has no documents: add `needs: [<stage writing {DOCS_FILE}>]` "
            "or a `docs:` jsonl file"
        )
    path = Path(given)
    return path if path.is_absolute() else ctx.spec_file.parent / path


def read_docs(path: Path, field: str) -> list[str]:
    """The `field` text of every row of a jsonl file; a bad row is a StageError at file:line."""
    texts: list[str] = []
    problems: list[str] = []
    hint = f'each line must be a JSON object with a non-empty string field {field!r}: {{"{field}": "..."}}'
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue  # blank lines (a trailing newline) are no rows
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(row, dict):
                problems.append(f"{where}: a JSON {type(row).__name__}, not an object")
            elif field not in row:
                fields = ", ".join(sorted(row)) or "none"
                problems.append(
                    f"{where}: no {field!r} field (it has: {fields}); set the stage's `text_field` "
                    "if the text is under another name"
                )
            elif not isinstance(row[field], str) or not row[field].strip():
                shown = json.dumps(row[field])[:40]
                problems.append(f"{where}: {field!r} is {shown}, not a non-empty string")
            else:
                texts.append(row[field])
    if problems:
        more = len(problems) - MAX_REPORTED_ROWS
        shown = problems[:MAX_REPORTED_ROWS] + ([f"... and {more} more bad rows"] if more > 0 else [])
        raise StageError("bad documents:\n  " + "\n  ".join(shown) + f"\nfix: {hint}")
    if not texts:
        raise StageError(f"{path}: no documents ({hint})")
    return texts


# --- training --------------------------------------------------------------------------------


@dataclass
class Finetuned:
    """What a run produced: the trained peft model (for tests and later modes) and its metrics."""

    model: Any
    metrics: dict[str, Any]
    metadata: dict[str, Any]


def _window(n_steps: int) -> int:
    """How many steps `initial_loss` and `final_loss` average: a fifth of the run, 1 to 5."""
    return max(1, min(5, n_steps // 5))


def _plot(history: list[StepRecord], path: Path, title: str) -> None:

    figure = new_figure(6, 3.5)
    axes = figure.add_subplot()
    axes.plot([r.step for r in history], [r.loss for r in history], marker="." if len(history) < 50 else None)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (nats per token)")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)


def _lora_model(model: Any, lora: Mapping[str, Any]) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=list(lora["target_modules"]),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        import torch

        linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        known = ", ".join(sorted(linear))
        raise StageError(f"lora.target_modules: {exc} (this model's linear modules: {known})") from None


def _save_adapter(model: Any, path: Path) -> None:
    # peft would also save the full (untrained) lm_head/embedding weights whenever they are
    # adapter targets, in case the vocabulary was resized; it never is here
    model.save_pretrained(path, save_embedding_layers=False)


def _rows(texts: list[str], tokenizer: Any, p: Mapping[str, Any]) -> tuple[Sequences, dict[str, int]]:
    """Tokenized documents (each ending in EOS) as packed or padded rows, and token counts."""
    from harness.training import pack, pad, with_eos

    if tokenizer.eos_token_id is None:
        raise StageError(f"the tokenizer of {p['base']!r} has no EOS token to end documents with")
    encoded = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
    documents = with_eos(encoded, tokenizer.eos_token_id)
    corpus = sum(map(len, documents))
    if p["packing"]:
        rows, dropped = pack(documents, p["max_length"])
        if len(rows) == 0:
            raise StageError(
                f"the {len(texts)} documents hold {corpus} tokens, fewer than one packed block of "
                f"max_length={p['max_length']}; lower max_length or add documents"
            )
        # packing drops the last partial block; padding truncates documents over max_length
        return rows, {"n_corpus_tokens": corpus, "tokens_dropped": dropped, "tokens_truncated": 0}
    rows, truncated = pad(documents, p["max_length"], tokenizer.pad_token_id)
    return rows, {"n_corpus_tokens": corpus, "tokens_dropped": 0, "tokens_truncated": truncated}


def finetune(ctx: StageContext) -> Finetuned:
    import torch

    from harness.models import load_model, load_tokenizer
    from harness.training import Diverged, TrainConfig, seeded, train

    started = time.perf_counter()
    p = settings(ctx.params)
    out = ctx.out_dir
    texts = read_docs(docs_file(ctx), p["text_field"])
    rows, counts = _rows(texts, load_tokenizer(p["base"]), p)
    layout = "packed" if p["packing"] else "padded"

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16_used = bool(p["bf16"] and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if p["bf16"] and not bf16_used:
        ctx.log(f"bf16 was requested but is not supported on {device.type} here: training in fp32")
    config = TrainConfig(
        learning_rate=p["learning_rate"],
        epochs=p["epochs"],
        batch_size=p["batch_size"],
        gradient_accumulation=p["gradient_accumulation"],
        warmup_ratio=p["warmup_ratio"],
        weight_decay=p["weight_decay"],
        autocast_dtype=torch.bfloat16 if bf16_used else None,
    )
    with seeded(ctx.seed):  # adapter init and dropout, without touching the caller's RNG
        # frozen base weights in bf16 halve memory; peft keeps the adapter itself in fp32
        dtype = torch.bfloat16 if bf16_used else torch.float32
        base_model = load_model(p["base"], dtype=dtype, device=str(device))
        limit = getattr(base_model.config, "max_position_embeddings", None)
        if limit and p["max_length"] > limit:
            ctx.log(f"max_length {p['max_length']} exceeds the model's max_position_embeddings {limit}")
        model = _lora_model(base_model, p["lora"])
        trainable = sum(t.numel() for t in model.parameters() if t.requires_grad)
        total_params = sum(t.numel() for t in model.parameters())
        ctx.log(
            f"{len(texts)} documents: {rows.n_tokens} tokens in {len(rows)} {layout} rows; "
            f"{trainable:,} trainable of {total_params:,} parameters on {device.type}"
        )
        with (out / "loss.jsonl").open("w", encoding="utf-8") as loss_log:

            def on_step(record: StepRecord) -> None:
                loss_log.write(json.dumps(asdict(record)) + "\n")
                loss_log.flush()  # readable while training, and kept by a failed run
                if p["checkpoint_every"] and record.step % p["checkpoint_every"] == 0:
                    _save_adapter(model, out / "checkpoints" / f"step-{record.step}")

            try:
                result = train(
                    model, rows, config, seed=ctx.seed, device=device, log=ctx.log, on_step=on_step
                )
            except Diverged as exc:
                raise StageError(f"{exc}; lower learning_rate (now {p['learning_rate']:g})") from None
    _save_adapter(model, out / "adapter")

    losses = [r.loss for r in result.history]
    window = _window(len(losses))
    initial, final = sum(losses[:window]) / window, sum(losses[-window:]) / window
    _plot(result.history, out / "loss.png", f"{ctx.stage}: {p['base']} ({layout})")
    metadata = {
        "base": p["base"],
        "base_fingerprint": base_fingerprint(p["base"]),
        "trainable_params": trainable,
        "total_params": total_params,
        "n_docs": len(texts),
        "n_sequences": len(rows),
        "n_tokens": rows.n_tokens,
        **counts,
        "tokens_seen": result.tokens_seen,
        "n_steps": len(losses),
        "packing": p["packing"],
        "max_length": p["max_length"],
        "bf16_requested": p["bf16"],
        "bf16_used": bf16_used,
        "device": str(device),
        "seed": ctx.seed,
        "train_seconds": round(result.seconds, 3),
        "seconds": round(time.perf_counter() - started, 3),
        "settings": p,
    }
    (out / "train_metadata.json").write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    metrics = {
        "initial_loss": initial,
        "final_loss": final,
        "loss_drop": initial - final,
        "n_tokens": rows.n_tokens,
        "n_steps": len(losses),
        "trainable_params": trainable,
        "tokens_per_second": result.tokens_seen / max(result.seconds, 1e-9),
        "loss_curve": losses,
    }
    ctx.log(f"loss {initial:.4f} -> {final:.4f} in {len(losses)} steps; adapter saved")
    return Finetuned(model, metrics, metadata)


def run(ctx: StageContext) -> dict[str, Any]:
    return finetune(ctx).metrics


KIND = StageKind(
    name="finetune_lora",
    run=run,
    params_schema=SCHEMA,
    metrics=METRICS,
    version=VERSION,
    input_params=("docs",),
    check=check,
    code_version=base_code_version(VERSION),
)
