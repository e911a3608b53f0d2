"""Which option of an MCQ does a causal LM prefer? Letter and continuation scoring.

- letter: the prompt shows the options (`harness.lab.mcq.format_prompt`) and ends at the
  decision token (the last input token, "answer:" 's colon); the logits there for each
  option's letter token, softmaxed over the item's letters only, give its probabilities.
- continuation: the summed log-probability of " " + option text after
  `continuation_prompt(question)`, softmaxed over the item's options. A sum penalises
  long options (every token costs probability), so `normalized` offers the choices
  lm-eval reports: none (the sum, lm-eval's `acc`), chars (the sum divided by the option
  text's length in characters, lm-eval's `acc_norm`) and tokens (divided by its number of
  tokens: the mean log-likelihood per token).

Batches are right-padded, so a row's real tokens sit at positions 0..n-1 exactly as when
it runs alone and the decision token is the last non-pad one: results do not depend on
the batch size (up to float rounding). torch is imported lazily: stage kinds that use
this module are imported at collection.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harness.core.stage import StageError
from harness.lab.mcq import MCQ, format_prompt

if TYPE_CHECKING:
    import torch

LETTER = "letter"
CONTINUATION = "continuation"
MODES = (LETTER, CONTINUATION)
NONE, CHARS, TOKENS = "none", "chars", "tokens"
NORMALIZATIONS = (NONE, CHARS, TOKENS)
ANSWER_CUE = "answer:"

Progress = Callable[[int, int], None]  # (items done, items in all)


@dataclass(frozen=True)
class Scored:
    """One item's scores: the exact prompt text, the score per option (the letter's logit,
    or the option's log-likelihood: summed, or as `normalized` divides it) and the softmax
    of those over the options; in continuation mode also each option's number of tokens."""

    prompt: str
    scores: dict[str, float]
    probs: dict[str, float]
    n_tokens: dict[str, int] = field(default_factory=dict)


# --- prompts -------------------------------------------------------------------------


def continuation_prompt(question: str) -> str:
    """The prompt whose continuation " " + option text is scored in continuation mode."""
    return f"question: {question}\n{ANSWER_CUE}"


def chat_wrap(tokenizer: Any, prompt: str) -> str:
    """`prompt` as a chat: everything before its final "answer:" line is the user message,
    then the tokenizer's generation prompt, then "answer:", so the next token is still the
    answer (the assistant turn opens with the same cue the plain prompt ends with)."""
    body, _, cue = prompt.rpartition("\n")
    if cue != ANSWER_CUE or not body:
        raise ValueError(f"an MCQ prompt ends with a line {ANSWER_CUE!r}, got {prompt!r}")
    if not getattr(tokenizer, "chat_template", None):
        raise StageError(
            "chat_template: true, but the tokenizer has no chat template; "
            "set chat_template: false or use a tokenizer that has one"
        )
    messages = [{"role": "user", "content": body}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + ANSWER_CUE


def encode(tokenizer: Any, text: str, chat: bool = False) -> list[int]:
    """Token ids of a prompt. A chat-templated text already holds its special tokens (BOS):
    adding them again would double them."""
    return list(tokenizer(text, add_special_tokens=not chat)["input_ids"])


# --- batching ------------------------------------------------------------------------


def right_pad(tokenizer: Any, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask of `sequences`, padded on the right."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None:
        raise StageError("the tokenizer has no pad token; load it with harness.lab.models.load_tokenizer")
    batch = tokenizer.pad({"input_ids": [list(s) for s in sequences]}, padding=True, return_tensors="pt")
    if tokenizer.padding_side != "right":  # the decision index below relies on it
        raise RuntimeError("the tokenizer did not pad on the right")
    return batch["input_ids"], batch["attention_mask"]


def last_token_indices(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, sequences: Sequence[Sequence[int]]
) -> torch.Tensor:
    """Index of each row's last non-pad token (the decision token), checked: the mask must be
    a run of ones from position 0 of each row's own length, ending on its own last token."""
    import torch

    lengths = attention_mask.sum(dim=1)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    if not torch.equal(attention_mask.bool(), positions[None, :] < lengths[:, None]):
        raise RuntimeError("batch is not right-padded: its attention mask is not a prefix of ones")
    indices = lengths - 1
    for row, (sequence, index) in enumerate(zip(sequences, indices.tolist(), strict=True)):
        if index != len(sequence) - 1 or int(input_ids[row, index]) != sequence[-1]:
            raise RuntimeError(f"row {row}: the decision index {index} is not its last non-pad token")
    return indices


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first: less padding, and an
    out-of-memory error shows on the first batch rather than the last)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


# --- letter scoring ------------------------------------------------------------------


def letter_token_ids(tokenizer: Any, letters: Sequence[str]) -> dict[str, int]:
    """The single token each option letter is predicted as after "answer:".

    " A" (with its space, as in "answer: A") if every letter is one token that way, else
    "A" if every letter is; one form for all letters, so that their logits compare alike.
    """
    tried = []
    for prefix in (" ", ""):
        ids = {letter: tokenizer.encode(prefix + letter, add_special_tokens=False) for letter in letters}
        singles = {letter: found[0] for letter, found in ids.items() if len(found) == 1}
        if len(singles) == len(letters) and len(set(singles.values())) == len(letters):
            return singles
        tried.append(", ".join(f"{prefix + letter!r} -> {found}" for letter, found in ids.items()))
    raise StageError(
        "letter scoring needs each option letter to be one distinct token, but the tokenizer gives "
        + "; ".join(tried)
        + ". Use scoring: continuation for this tokenizer."
    )


def letter_logits(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    token_ids: Sequence[int],
    batch_size: int,
    progress: Progress | None = None,
) -> torch.Tensor:
    """[n_prompts, len(token_ids)] float32 logits of `token_ids` at each prompt's last token."""
    import torch

    out = torch.empty(len(prompts), len(token_ids), dtype=torch.float32)
    wanted = torch.tensor(list(token_ids))
    done = 0
    with torch.inference_mode():
        for batch in _batches([len(p) for p in prompts], batch_size):
            sequences = [prompts[i] for i in batch]
            input_ids, mask = right_pad(tokenizer, sequences)
            last = last_token_indices(input_ids, mask, sequences)
            # the head runs only at the positions some row decides at, not at every position
            keep, row_position = torch.unique(last, return_inverse=True)
            device = _device(model)
            logits = model(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                logits_to_keep=keep.to(device),
                use_cache=False,
            ).logits
            at_decision = logits[torch.arange(len(batch), device=device), row_position.to(device)]
            out[batch] = at_decision[:, wanted.to(device)].float().cpu()
            done += len(batch)
            if progress:
                progress(done, len(prompts))
    return out


# --- continuation scoring ------------------------------------------------------------


def continuation_logprobs(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int,
    progress: Progress | None = None,
) -> list[float]:
    """Summed log-probability of each (prompt ids, continuation ids) pair's continuation."""
    import torch

    out = [0.0] * len(pairs)
    sequences = [list(prompt) + list(cont) for prompt, cont in pairs]
    done = 0
    with torch.inference_mode():
        for batch in _batches([len(s) for s in sequences], batch_size):
            rows = [sequences[i] for i in batch]
            input_ids, mask = right_pad(tokenizer, rows)
            last_token_indices(input_ids, mask, rows)  # checks the padding
            width = input_ids.shape[1]
            starts = torch.tensor([len(pairs[i][0]) for i in batch])  # first continuation position
            if int(starts.min()) < 1:
                raise StageError("continuation scoring needs a non-empty prompt before each option")
            # logits at position p predict token p+1: keep positions from the earliest
            # prompt's last token on (the question's own positions are never needed)
            first = int(starts.min()) - 1
            device = _device(model)
            logits = model(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                logits_to_keep=width - first,
                use_cache=False,
            ).logits.float()
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1)  # positions first .. width-2
            targets = input_ids[:, first + 1 :].to(device)
            picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            target_pos = torch.arange(first + 1, width, device=device)[None, :]
            lengths = mask.sum(dim=1).to(device)[:, None]
            scored = (target_pos >= starts.to(device)[:, None]) & (target_pos < lengths)
            totals = (picked * scored).sum(dim=1).double().cpu().tolist()
            for i, total in zip(batch, totals, strict=True):
                out[i] = total
            done += len(batch)
            if progress:
                progress(done, len(pairs))
    return out


# --- MCQs ----------------------------------------------------------------------------


def softmax(scores: Mapping[str, float]) -> dict[str, float]:
    top = max(scores.values())
    weights = {key: math.exp(value - top) for key, value in scores.items()}
    total = sum(weights.values())
    return {key: weight / total for key, weight in weights.items()}


def entropy(probs: Mapping[str, float]) -> float:
    """Shannon entropy in nats."""
    return -sum(p * math.log(p) for p in probs.values() if p > 0)


def score_mcqs(
    model: Any,
    tokenizer: Any,
    items: Sequence[MCQ],
    mode: str = LETTER,
    batch_size: int = 16,
    chat_template: bool = False,
    progress: Progress | None = None,
) -> list[Scored]:
    """Score every item's options with `model` (see the module docstring for the modes)."""
    if mode == LETTER:
        prompts = [format_prompt(item.question, item.options) for item in items]
    elif mode == CONTINUATION:
        prompts = [continuation_prompt(item.question) for item in items]
    else:
        raise ValueError(f"scoring mode must be one of {MODES}, got {mode!r}")
    if chat_template:
        prompts = [chat_wrap(tokenizer, prompt) for prompt in prompts]
    ids = [encode(tokenizer, prompt, chat_template) for prompt in prompts]

    scores: list[dict[str, float]]
    n_tokens: list[dict[str, int]] = [{} for _ in items]  # continuation mode only
    if mode == LETTER:
        letters = sorted({letter for item in items for letter in item.options})
        token_ids = letter_token_ids(tokenizer, letters)
        logits = letter_logits(model, tokenizer, ids, [token_ids[c] for c in letters], batch_size, progress)
        column = {letter: i for i, letter in enumerate(letters)}
        scores = [
            {letter: float(logits[row, column[letter]]) for letter in item.options}
            for row, item in enumerate(items)
        ]
    else:
        pairs, owners = [], []
        for row, item in enumerate(items):
            for letter, text in item.options.items():
                pairs.append((ids[row], continuation_ids(tokenizer, text)))
                owners.append((row, letter))
        totals = continuation_logprobs(
            model, tokenizer, pairs, batch_size, _per_item(progress, len(items), len(pairs))
        )
        scores = [{} for _ in items]
        for (row, letter), (_, option_ids), total in zip(owners, pairs, totals, strict=True):
            scores[row][letter] = total
            n_tokens[row][letter] = len(option_ids)
    return [Scored(prompt, s, softmax(s), n) for prompt, s, n in zip(prompts, scores, n_tokens, strict=True)]


def normalized(scored: Scored, options: Mapping[str, str], normalization: str) -> Scored:
    """A continuation-scored item under `normalization` (see the module docstring), its
    probabilities the softmax of the normalised scores. lm-eval divides by the length of
    the option text itself, without the space that joins it to the prompt; so does this."""
    if normalization == NONE:
        return scored
    if not scored.n_tokens:
        raise ValueError("normalization applies to continuation scores (summed log-likelihoods) only")
    if normalization == CHARS:
        divisors = {letter: len(options[letter]) for letter in scored.scores}
    elif normalization == TOKENS:
        divisors = scored.n_tokens
    else:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    scores = {letter: total / divisors[letter] for letter, total in scored.scores.items()}
    return Scored(scored.prompt, scores, softmax(scores), scored.n_tokens)


def continuation_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of the continuation " " + option text, encoded on its own (so the prompt's
    tokens are the same for every option) and without special tokens (no BOS mid-sequence)."""
    return list(tokenizer(" " + text, add_special_tokens=False)["input_ids"])


def _per_item(progress: Progress | None, n_items: int, n_pairs: int) -> Progress | None:
    """Report option-level progress as (approximate) items."""
    if progress is None:
        return None
    return lambda done, _total: progress(done * n_items // n_pairs, n_items)
