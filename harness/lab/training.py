"""Causal-LM training on token sequences: packing, padding and a small AdamW loop.

Kept apart from any stage kind so that other training modes reuse it: continued pretraining
(`finetune_lora`) packs whole documents; an SFT mode builds its own `Sequences` with prompt
tokens labelled `IGNORE` and calls the same `train`, which only steps the parameters that
require grad (a frozen extra adapter stays frozen).

A plain torch loop rather than HF Trainer: on CPU its per-step overhead matters, and the
loss is weighted per token across gradient-accumulation micro-batches, which we control here.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100  # label of positions that carry no loss (torch's cross_entropy ignore_index)


@dataclass
class Sequences:
    """Training rows of equal length: `labels` is `IGNORE` wherever no loss is taken."""

    input_ids: torch.Tensor  # [n, length] int64
    attention_mask: torch.Tensor  # [n, length], 1 on real tokens, 0 on pads
    labels: torch.Tensor  # [n, length] int64

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def n_tokens(self) -> int:
        """Real (non-pad) tokens."""
        return int(self.attention_mask.sum())


def with_eos(token_lists: Sequence[Sequence[int]], eos_id: int) -> list[list[int]]:
    """Each document followed by EOS (once: some tokenizers append it themselves)."""
    return [list(ids) if ids and ids[-1] == eos_id else [*ids, eos_id] for ids in token_lists]


def pack(token_lists: Sequence[Sequence[int]], max_length: int) -> tuple[Sequences, int]:
    """Concatenate the documents and cut them into blocks of exactly `max_length` tokens.

    The last partial block is dropped (returned: how many tokens were dropped, always fewer
    than `max_length`) so that every row is full and nothing is padded. Documents are not
    isolated from each other inside a block (no cross-document attention mask): standard
    for continued pretraining, and the EOS between them marks the boundary.
    """
    flat = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.long)
    n_blocks = flat.numel() // max_length
    blocks = flat[: n_blocks * max_length].view(n_blocks, max_length)
    rows = Sequences(blocks, torch.ones_like(blocks), blocks.clone())
    return rows, flat.numel() - n_blocks * max_length


def pad(token_lists: Sequence[Sequence[int]], max_length: int, pad_id: int) -> tuple[Sequences, int]:
    """One document per row, truncated to `max_length` and right-padded to it.

    Pads get attention 0 and label `IGNORE` (masked by position, not by id, so a pad id
    equal to EOS still trains the real EOS). Returns the rows and the tokens truncated away.
    """
    n = len(token_lists)
    input_ids = torch.full((n, max_length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, max_length), dtype=torch.long)
    truncated = 0
    for row, ids in enumerate(token_lists):
        kept = ids[:max_length]
        truncated += len(ids) - len(kept)
        input_ids[row, : len(kept)] = torch.tensor(kept, dtype=torch.long)
        attention_mask[row, : len(kept)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
    return Sequences(input_ids, attention_mask, labels), truncated


class Diverged(ArithmeticError):
    """The loss became NaN or infinite: later steps would only train on garbage."""


@dataclass(frozen=True)
class TrainConfig:
    learning_rate: float
    epochs: int = 1
    batch_size: int = 8
    gradient_accumulation: int = 1
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    autocast_dtype: torch.dtype | None = None  # e.g. torch.bfloat16 on a GPU that has it


@dataclass(frozen=True)
class StepRecord:
    step: int  # 1-based optimizer step
    loss: float  # mean per label token over the step's micro-batches
    lr: float
    grad_norm: float  # before clipping
    tokens_seen: int  # real input tokens so far


@dataclass
class TrainResult:
    history: list[StepRecord]
    seconds: float  # the loop alone: no loading or saving

    @property
    def tokens_seen(self) -> int:
        return self.history[-1].tokens_seen if self.history else 0


def steps_per_epoch(n_rows: int, config: TrainConfig) -> int:
    return math.ceil(math.ceil(n_rows / config.batch_size) / config.gradient_accumulation)


def warmup_steps(total: int, ratio: float) -> int:
    return min(total, math.ceil(total * ratio))


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak LR at 0-based optimizer step `step`: linear up over `warmup`
    steps (the first step already non-zero), then linear down to 1/(total-warmup) at the last,
    so no step is wasted at LR 0."""
    if step < warmup:
        return (step + 1) / warmup
    return (total - step) / max(1, total - warmup)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG (adapter init, dropout) for a block, restoring it afterwards,
    so that a run is reproducible without changing the caller's random state."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _micro_batches(n_rows: int, config: TrainConfig, generator: torch.Generator) -> list[list[torch.Tensor]]:
    """One epoch: a seeded shuffle of row indices, in micro-batches grouped per optimizer step."""
    batches = list(torch.randperm(n_rows, generator=generator).split(config.batch_size))
    step = config.gradient_accumulation
    return [batches[i : i + step] for i in range(0, len(batches), step)]


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def train(
    model: torch.nn.Module,
    data: Sequences,
    config: TrainConfig,
    *,
    seed: int,
    device: torch.device | str,
    progress: Callable[[int, int, str], None] | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
) -> TrainResult:
    """Next-token training of `model`'s trainable parameters on `data` (AdamW, linear warmup
    and decay, gradient accumulation, grad-norm clipping). Rows are shuffled per epoch by a
    generator seeded with `seed`; wrap the call in `seeded` for reproducible dropout too.
    `progress(step, total, detail)` follows each step (ctx.progress). Raises `Diverged` at the
    first step whose loss is not finite."""
    if len(data) == 0:
        raise ValueError("no training rows")
    device = torch.device(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    total = steps_per_epoch(len(data), config) * config.epochs
    warmup = warmup_steps(total, config.warmup_ratio)
    generator = torch.Generator().manual_seed(seed)
    history: list[StepRecord] = []
    tokens_seen = 0
    model.train()
    start = time.perf_counter()
    for _ in range(config.epochs):
        for group in _micro_batches(len(data), config, generator):
            # every label token of the optimizer step weighs the same, however the rows split
            n_labels = max(1, sum(int((data.labels[idx, 1:] != IGNORE).sum()) for idx in group))
            step_loss = 0.0
            for idx in group:
                # rows are right-padded to max_length: a micro-batch is cut to its longest row,
                # so short chats do not pay for max_length (the pads are masked either way)
                width = int(data.attention_mask[idx].sum(dim=1).max())
                input_ids = data.input_ids[idx, :width].to(device)
                attention_mask = data.attention_mask[idx, :width].to(device)
                labels = data.labels[idx, :width].to(device)
                with _autocast(device, config.autocast_dtype):
                    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
                loss = (
                    F.cross_entropy(
                        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                        labels[:, 1:].reshape(-1),
                        ignore_index=IGNORE,
                        reduction="sum",
                    )
                    / n_labels
                )
                loss.backward()
                step_loss += loss.item()
                tokens_seen += int(data.attention_mask[idx].sum())
            if not math.isfinite(step_loss):
                raise Diverged(f"the loss became {step_loss} at optimizer step {len(history) + 1} of {total}")
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            lr = config.learning_rate * lr_factor(len(history), total, warmup)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            record = StepRecord(len(history) + 1, step_loss, lr, float(grad_norm), tokens_seen)
            history.append(record)
            if on_step is not None:
                on_step(record)
            if progress is not None:
                rate = tokens_seen / max(time.perf_counter() - start, 1e-9)
                progress(record.step, total, f"loss {record.loss:.4f}, lr {lr:.2e}, {rate:,.0f} tokens/s")
    model.eval()
    return TrainResult(history, time.perf_counter() - start)
