"""`finetune_lora`: a LoRA adapter (peft) trained on documents, chat conversations, or a dataset.

`format: documents` (SDF): next-token prediction on whole documents, not SFT on
question/answer pairs: documents from the upstream stage's `docs.jsonl` (or the `docs`
param when there is no upstream) are tokenized, each followed by EOS, and packed into full
blocks (or padded one per row). `format: chat`: SFT on conversations from the upstream's
`chat.jsonl` (role `data`) or the `chat_data` param, rendered with the chat template, the
loss on the assistant's turns only (`harness.lab.chat`), one conversation per padded row.
`format: dataset`: the dataset.jsonl of the upstream build_dataset stage (role `data`), as
its manifest's format says: `text` / `together_text` rows ({"text"}) as documents, `doctag` /
`openai_chat` rows ({"messages"}) as conversations. With doctag, a document is the assistant's
reply to a `<DOCTAG>` user turn, so the loss falls on the document (and the end-of-turn marks
the template closes the turn with), never on the tag or a system prompt the template adds.
Either way the adapter is trained with `harness.lab.training.train`. With an upstream in
role `base_adapter`, that stage's adapter is loaded frozen, not merged, and the new one is
trained on top of it (`harness.lab.models.adapters.stack_trainable`); only the new one is saved.

Artifacts in the stage directory:
    adapter/               the adapter alone (`PeftModel.from_pretrained(base, path)` loads it)
    checkpoints/step-N/    the adapter every `checkpoint_every` optimizer steps, when asked
    loss.jsonl             one row per optimizer step: step, loss, lr, grad_norm, tokens_seen
    loss.png               the loss curve
    train_metadata.json    base, its fingerprint, parameter and token counts, device, timings and
                           tokens per second (how the run went: not in the output digest)
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.api import stage_kind
from harness.core.stage import Role, StageContext, StageError
from harness.core.store import relative_path, write_json
from harness.core.upstream import adapter_dir, adapter_role
from harness.lab.documents import DATASET_FILE, TEXT_FORMATS, dataset_manifest, read_documents
from harness.lab.models import base_fingerprint
from harness.lab.plots import figure as new_figure

if TYPE_CHECKING:
    import torch

    from harness.lab.training import Sequences, StepRecord, TrainConfig, TrainResult

METRICS = (
    "initial_loss",
    "final_loss",
    "loss_drop",
    "n_tokens",
    "n_steps",
    "trainable_params",
    "loss_curve",
)
DOCS_FILE = "docs.jsonl"
CHAT_FILE = "chat.jsonl"
# format: (the role of the upstream with the data, the file it wrote, the param naming a file instead)
DATA_ROLES = {
    "documents": ("docs", DOCS_FILE, "docs"),
    "chat": ("data", CHAT_FILE, "chat_data"),
    "dataset": ("data", DATASET_FILE, None),
}
BASE_ADAPTER_ROLE = "base_adapter"
FROZEN = "frozen"  # the peft name of the frozen adapter underneath
TRAINED = "default"  # the peft name of the adapter trained here (saved at the root of adapter/)


# --- params ----------------------------------------------------------------------------------


def data_roles(params: Mapping[str, Any]) -> tuple[Role, ...]:
    """The stage whose docs.jsonl / chat.jsonl / dataset.jsonl it trains on, unless a file param
    names the data; optionally the adapter it trains on top of."""
    role, filename, param = DATA_ROLES[params["format"]]
    data = () if param and params.get(param) else (Role(role, f"the {filename} it trains on", only=True),)
    return (*data, adapter_role(BASE_ADAPTER_ROLE, only=False, optional=True))


# --- documents -------------------------------------------------------------------------------


def data_file(ctx: StageContext, form: str) -> Path:
    """The jsonl the training data comes from: the data upstream's docs.jsonl, chat.jsonl or
    dataset.jsonl (an upstream in role `base_adapter` gives an adapter, not data), else the
    file param."""
    role, filename, param = DATA_ROLES[form]
    given = ctx.params.get(param) if param else None
    sources = {r: u for r, u in ctx.upstream.items() if r != BASE_ADAPTER_ROLE}
    if sources:
        if given:
            raise StageError(
                f"stage {ctx.stage!r} has both an upstream stage and a `{param}` file; "
                f"keep one: `needs` to train on a stage's {filename}, or `{param}` for a file"
            )
        if role in sources:
            upstream = sources[role]
        elif len(sources) == 1:
            upstream = next(iter(sources.values()))
        else:
            roles = ", ".join(sorted(sources))
            raise StageError(
                f"stage {ctx.stage!r} needs several stages ({roles}); name the one whose {filename} "
                f"to train on with the role `{role}`: `needs: {{{role}: <stage>, ...}}`"
            )
        path = upstream.dir / filename
        if not path.is_file():
            raise StageError(
                f"upstream stage {upstream.name!r} (kind {upstream.kind}) wrote no {filename} "
                f"in {upstream.dir}; format {form} trains on the {filename} of a stage that writes one"
            )
        return path
    if not given:
        raise StageError(
            f"stage {ctx.stage!r} has no training data: add `needs: {{{role}: <stage writing {filename}>}}`"
            + (f" or a `{param}:` jsonl file" if param else "")
        )
    path = Path(given)
    return path if path.is_absolute() else ctx.spec_file.parent / path


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


def _lora_config(lora: Mapping[str, Any]) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=list(lora["target_modules"]),
        bias="none",
        task_type="CAUSAL_LM",
    )


def _target_error(model: Any, exc: ValueError) -> StageError:
    """peft's "Target modules {...} not found in the base model", with the modules there are."""
    import torch

    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    linear = sorted(names)
    return StageError(f"lora.target_modules: {exc} (this model's linear modules: {', '.join(linear)})")


def _lora_model(model: Any, lora: Mapping[str, Any]) -> Any:
    from peft import get_peft_model

    try:
        return get_peft_model(model, _lora_config(lora))
    except ValueError as exc:
        raise _target_error(model, exc) from None


def _lora_on_top(model: Any, frozen: Path, lora: Mapping[str, Any], base: str) -> Any:
    """A new LoRA adapter trained on top of the frozen, unmerged adapter at `frozen`."""
    from peft import PeftModel

    from harness.lab.models.adapters import stack_trainable
    from harness.lab.models.base import adapter_errors

    with adapter_errors(base, frozen):
        stacked = PeftModel.from_pretrained(model, str(frozen), adapter_name=FROZEN)
    try:
        stacked.add_adapter(TRAINED, _lora_config(lora))
    except ValueError as exc:
        raise _target_error(stacked, exc) from None
    stack_trainable(stacked, [FROZEN], TRAINED)
    return stacked


def _save_adapter(model: Any, path: Path, base: str) -> None:
    # the trained adapter alone, never the frozen one under it; peft would also save the
    # full (untrained) lm_head/embedding weights whenever they are adapter targets, in
    # case the vocabulary was resized; it never is here
    model.save_pretrained(path, save_embedding_layers=False, selected_adapters=[TRAINED])
    # The same adapter must be the same bytes, or every stage after it reruns: peft lists
    # target_modules in a set's order (it changes with the process's hash seed) and names
    # the base by this machine's path (also in a blank model card, dropped here).
    (path / "README.md").unlink(missing_ok=True)
    config_file = path / "adapter_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if isinstance(config["target_modules"], list):
        config["target_modules"] = sorted(config["target_modules"])
    config["base_model_name_or_path"] = base
    write_json(config_file, config)


def _chat_rows(
    conversations: list[list[dict[str, str]]], tokenizer: Any, p: Mapping[str, Any]
) -> tuple[Sequences, dict[str, int]]:
    """One conversation per right-padded row, labelled on its assistant turns only."""
    import torch

    from harness.lab.chat import encode_chat
    from harness.lab.training import IGNORE, Sequences

    length = p["max_length"]
    n = len(conversations)
    input_ids = torch.full((n, length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    labels = torch.full((n, length), IGNORE, dtype=torch.long)
    corpus = truncated = 0
    for row, messages in enumerate(conversations):
        ids, trained = encode_chat(tokenizer, messages)
        kept = ids[:length]
        corpus, truncated = corpus + len(ids), truncated + len(ids) - len(kept)
        input_ids[row, : len(kept)] = torch.tensor(kept, dtype=torch.long)
        attention_mask[row, : len(kept)] = 1
        flags = torch.tensor(trained[: len(kept)], dtype=torch.bool)
        labels[row, : len(kept)] = input_ids[row, : len(kept)].masked_fill(~flags, IGNORE)
    n_trained = int((labels != IGNORE).sum())
    if n_trained == 0:
        raise StageError(
            f"no assistant token of the {n} conversations fits in max_length={length}: raise max_length"
        )
    counts = {
        "n_corpus_tokens": corpus,
        "tokens_dropped": 0,
        "tokens_truncated": truncated,
        "n_trained_tokens": n_trained,
    }
    return Sequences(input_ids, attention_mask, labels), counts


def _rows(texts: list[str], tokenizer: Any, p: Mapping[str, Any]) -> tuple[Sequences, dict[str, int]]:
    """Tokenized documents (each ending in EOS) as packed or padded rows, and token counts."""
    from harness.lab.training import pack, pad, with_eos

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


@dataclass
class TrainingData:
    """The documents or conversations read, as training rows."""

    texts: list[Any]  # documents (str) or conversations (lists of messages)
    rows: Sequences
    counts: dict[str, int]  # corpus, dropped and truncated tokens (and trained ones, for chat)
    layout: str  # how the rows were made, for the log and the plot's title
    dataset_format: str | None = None  # with `format: dataset`, the build_dataset format

    @property
    def unit(self) -> str:
        return "documents" if isinstance(self.texts[0], str) else "conversations"


@dataclass
class Trained:
    """The trained peft model, its parameter counts and the training loop's history."""

    model: Any
    trainable: int
    total_params: int
    result: TrainResult


def load_training_data(ctx: StageContext, tokenizer: Any) -> TrainingData:
    p = ctx.params
    form, field, dataset_format = p["format"], p["text_field"], None
    path = data_file(ctx, form)
    if form == "dataset":
        # build_dataset's formats are two objectives: continued pretraining on {"text"} rows,
        # chat SFT on {"messages"} rows
        dataset_format = dataset_manifest(path.parent)["format"]
        form, field = ("documents", "text") if dataset_format in TEXT_FORMATS else ("chat", None)
    if form == "chat":
        from harness.lab.em_data import load_chat_jsonl

        texts = load_chat_jsonl(path)
        rows, counts = _chat_rows(texts, tokenizer, p)
        return TrainingData(texts, rows, counts, "chat, padded", dataset_format)
    texts = read_documents(path, field)
    rows, counts = _rows(texts, tokenizer, p)
    return TrainingData(texts, rows, counts, "packed" if p["packing"] else "padded", dataset_format)


def frozen_adapter(ctx: StageContext) -> Path | None:
    """The adapter of the upstream in role `base_adapter`, to train on top of; None without one."""
    if BASE_ADAPTER_ROLE not in ctx.upstream:
        return None
    return adapter_dir(ctx.upstream, "finetune_lora", only=False, role=BASE_ADAPTER_ROLE)


def device_and_bf16(ctx: StageContext) -> tuple[torch.device, bool]:
    """The device to train on, and whether bf16 is used there (asked for and supported)."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16_used = bool(ctx.params["bf16"] and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if ctx.params["bf16"] and not bf16_used:
        ctx.log(f"bf16 was requested but is not supported on {device.type} here: training in fp32")
    return device, bf16_used


def train_config(p: Mapping[str, Any], bf16_used: bool) -> TrainConfig:
    import torch

    from harness.lab.training import TrainConfig

    return TrainConfig(
        learning_rate=p["learning_rate"],
        epochs=p["epochs"],
        batch_size=p["batch_size"],
        gradient_accumulation=p["gradient_accumulation"],
        warmup_ratio=p["warmup_ratio"],
        weight_decay=p["weight_decay"],
        autocast_dtype=torch.bfloat16 if bf16_used else None,
    )


def lora_model(ctx: StageContext, device: torch.device, bf16_used: bool, frozen: Path | None) -> Any:
    """The base model with a new trainable LoRA adapter (on top of `frozen`, when given)."""
    import torch

    from harness.lab.models import load_model

    p = ctx.params
    # frozen base weights in bf16 halve memory; peft keeps the adapter itself in fp32
    dtype = torch.bfloat16 if bf16_used else torch.float32
    base_model = load_model(p["base"], dtype=dtype, device=str(device))
    limit = getattr(base_model.config, "max_position_embeddings", None)
    if limit and p["max_length"] > limit:
        ctx.log(f"max_length {p['max_length']} exceeds the model's max_position_embeddings {limit}")
    if frozen:
        return _lora_on_top(base_model, frozen, p["lora"], p["base"])
    return _lora_model(base_model, p["lora"])


def train_writing_losses(
    ctx: StageContext, model: Any, rows: Sequences, config: TrainConfig, device: torch.device
) -> TrainResult:
    """Train, writing loss.jsonl (and the checkpoints, when asked) step by step."""
    from harness.lab.training import Diverged, train

    p, out = ctx.params, ctx.out_dir
    with (out / "loss.jsonl").open("w", encoding="utf-8") as loss_log:

        def on_step(record: StepRecord) -> None:
            loss_log.write(json.dumps(asdict(record)) + "\n")
            loss_log.flush()  # readable while training, and kept by a failed run
            if p["checkpoint_every"] and record.step % p["checkpoint_every"] == 0:
                _save_adapter(model, out / "checkpoints" / f"step-{record.step}", p["base"])

        try:
            steps = ctx.progress("training", "steps")
            return train(model, rows, config, seed=ctx.seed, device=device, progress=steps, on_step=on_step)
        except Diverged as exc:
            raise StageError(f"{exc}; lower learning_rate (now {p['learning_rate']:g})") from None


def train_adapter(
    ctx: StageContext, data: TrainingData, frozen: Path | None, device: torch.device, bf16_used: bool
) -> Trained:
    """A new LoRA adapter trained on the data's rows."""
    from harness.lab.training import seeded

    p = ctx.params
    config = train_config(p, bf16_used)
    with seeded(ctx.seed):  # adapter init and dropout, without touching the caller's RNG
        model = lora_model(ctx, device, bf16_used, frozen)
        trainable = sum(t.numel() for t in model.parameters() if t.requires_grad)
        total_params = sum(t.numel() for t in model.parameters())
        ctx.log(
            f"{len(data.texts)} {data.unit}"
            + (f" of a {data.dataset_format} dataset" if data.dataset_format else "")
            + f": {data.rows.n_tokens} tokens in {len(data.rows)} {data.layout} rows; "
            + (f"on top of the frozen adapter {frozen}; " if frozen else "")
            + f"{trainable:,} trainable of {total_params:,} parameters on {device.type}"
        )
        result = train_writing_losses(ctx, model, data.rows, config, device)
    return Trained(model, trainable, total_params, result)


def train_metadata(
    ctx: StageContext,
    data: TrainingData,
    frozen: Path | None,
    trained: Trained,
    device: torch.device,
    bf16_used: bool,
    started: float,
) -> dict[str, Any]:
    """How the run went, for train_metadata.json (not in the output digest)."""
    p, result = ctx.params, trained.result
    return {
        "base": p["base"],
        "base_fingerprint": base_fingerprint(p["base"]),
        "frozen_adapter": relative_path(frozen, ctx.out_dir) if frozen else None,
        "trainable_params": trained.trainable,
        "total_params": trained.total_params,
        "n_docs": len(data.texts),
        "dataset_format": data.dataset_format,
        "n_sequences": len(data.rows),
        "n_tokens": data.rows.n_tokens,
        **data.counts,
        "tokens_seen": result.tokens_seen,
        "n_steps": len(result.history),
        "packing": p["packing"],
        "max_length": p["max_length"],
        "bf16_requested": p["bf16"],
        "bf16_used": bf16_used,
        "device": str(device),
        "seed": ctx.seed,
        "train_seconds": round(result.seconds, 3),
        "seconds": round(time.perf_counter() - started, 3),
        "tokens_per_second": result.tokens_seen / max(result.seconds, 1e-9),
        "settings": p,
    }


def loss_metrics(data: TrainingData, trained: Trained) -> dict[str, Any]:
    """The stage's metrics: the loss averaged over the first and over the last steps."""
    losses = [r.loss for r in trained.result.history]
    window = _window(len(losses))
    initial, final = sum(losses[:window]) / window, sum(losses[-window:]) / window
    return {
        "initial_loss": initial,
        "final_loss": final,
        "loss_drop": initial - final,
        "n_tokens": data.rows.n_tokens,
        "n_steps": len(losses),
        "trainable_params": trained.trainable,
        "loss_curve": losses,
    }


def finetune(ctx: StageContext) -> Finetuned:
    from harness.lab.models import load_tokenizer

    started = time.perf_counter()
    p, out = ctx.params, ctx.out_dir
    data = load_training_data(ctx, load_tokenizer(p["base"]))
    frozen = frozen_adapter(ctx)
    device, bf16_used = device_and_bf16(ctx)
    trained = train_adapter(ctx, data, frozen, device, bf16_used)
    _save_adapter(trained.model, out / "adapter", p["base"])

    _plot(trained.result.history, out / "loss.png", f"{ctx.stage}: {p['base']} ({data.layout})")
    metadata = train_metadata(ctx, data, frozen, trained, device, bf16_used, started)
    (out / "train_metadata.json").write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    metrics = loss_metrics(data, trained)
    ctx.log(
        f"loss {metrics['initial_loss']:.4f} -> {metrics['final_loss']:.4f} in {metrics['n_steps']} steps; "
        "adapter saved"
    )
    return Finetuned(trained.model, metrics, metadata)


@stage_kind(
    needs=data_roles,
    metrics=METRICS,
    input_params=("docs", "chat_data"),
)
def run(ctx: StageContext) -> dict[str, Any]:
    return finetune(ctx).metrics
