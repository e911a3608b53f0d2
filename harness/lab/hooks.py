"""Forward hooks on the residual stream, indexed like `output_hidden_states`.

Index 0 is the embeddings' output (the `embed_tokens` module) and index i >= 1 the output
of decoder block i-1, every one a raw residual stream. For the last index this differs
from Hugging Face's `hidden_states[-1]`, which has the final norm applied: it is the last
block's output before that norm, as `harness.lab.activations` extracts it, so a direction
learned there (a probe, a mean difference) lives in the space it is added to.
`check_alignment` verifies the correspondence on a real forward pass.

Everything works on a plain causal LM and on a peft `PeftModel` (whose adapter layers sit
inside the blocks, so a block's output includes them; under `disable_adapter()` it is the
base model's). Hooks are removed when their context exits, also on an exception.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from harness.lab.contrast import Contrast

STACK_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_norm")


def _unwrap(model: Any) -> Any:
    """The transformers model under a PeftModel (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _attr(obj: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def _blocks_and_owner(model: Any) -> tuple[Any, Any]:
    inner = _unwrap(model)
    for path in STACK_PATHS:
        blocks = _attr(inner, path)
        if blocks is not None:
            return blocks, _attr(inner, path.rpartition(".")[0])
    name = type(inner).__name__
    raise ValueError(f"cannot find the decoder blocks of {name} (looked at {', '.join(STACK_PATHS)})")


def residual_modules(model: Any) -> list[nn.Module]:
    """The module whose output is residual index i, for i = 0..L: embeddings, then blocks."""
    blocks, _ = _blocks_and_owner(model)
    return [_unwrap(model).get_input_embeddings(), *blocks]


def final_norm(model: Any) -> nn.Module:
    """The norm between the last block and the unembedding."""
    _, owner = _blocks_and_owner(model)
    norm = next((getattr(owner, n) for n in FINAL_NORMS if getattr(owner, n, None) is not None), None)
    if norm is None:
        raise ValueError(f"cannot find the final norm of {type(owner).__name__} (looked for {FINAL_NORMS})")
    return norm


def n_indices(model: Any) -> int:
    """How many residual indices there are: blocks + 1."""
    return len(residual_modules(model))


def _hidden(output: Any) -> torch.Tensor:
    return output if not isinstance(output, tuple) else output[0]


def _replace(output: Any, hidden: torch.Tensor) -> Any:
    # older transformers return (hidden, attentions, ...) from a block; keep the tail
    return hidden if not isinstance(output, tuple) else (hidden, *output[1:])


@contextmanager
def _hooked(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Run `fn` on the module's hidden output; a tensor it returns replaces that output."""

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        new = fn(_hidden(output))
        return None if new is None else _replace(output, new)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _module(model: Any, index: int) -> nn.Module:
    modules = residual_modules(model)
    if not 0 <= index < len(modules):
        raise IndexError(f"residual index {index} out of range 0..{len(modules) - 1}")
    return modules[index]


@contextmanager
def add_to_residual(model: Any, index: int, vector: torch.Tensor) -> Iterator[None]:
    """Add `vector` ([d]) to the residual at `index`, at every position of every forward
    pass in the context: the prompt's and, during generation, each new token's."""

    def add(hidden: torch.Tensor) -> torch.Tensor:
        return hidden + vector.to(device=hidden.device, dtype=hidden.dtype)

    with _hooked(_module(model, index), add):
        yield


@contextmanager
def record_residuals(model: Any, indices: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Yield a dict that the next forward pass fills with {index: [batch, seq, d]} (detached);
    a later pass in the same context overwrites it."""
    modules = residual_modules(model)
    recorded: dict[int, torch.Tensor] = {}
    handles = []
    try:
        for index in indices:
            if not 0 <= index < len(modules):
                raise IndexError(f"residual index {index} out of range 0..{len(modules) - 1}")

            def keep(_m: nn.Module, _i: Any, output: Any, index: int = index) -> None:
                recorded[index] = _hidden(output).detach()

            handles.append(modules[index].register_forward_hook(keep))
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def patch_residual(model: Any, index: int, positions: torch.Tensor, values: torch.Tensor) -> Iterator[None]:
    """Overwrite the residual at `index` at one position per row: row b's position
    `positions[b]` gets `values[b]` ([batch] and [batch, d]). A negative position leaves
    that row untouched (a prompt too short to have it)."""
    import torch

    def patch(hidden: torch.Tensor) -> torch.Tensor:
        pos = positions.to(hidden.device)
        rows = torch.nonzero(pos >= 0).squeeze(1)
        patched = hidden.clone()  # the hook's input may be reused by the caller's graph
        patched[rows, pos[rows]] = values.to(device=hidden.device, dtype=hidden.dtype)[rows]
        return patched

    with _hooked(_module(model, index), patch):
        yield


def check_alignment(model: Any, input_ids: torch.Tensor, atol: float = 1e-5) -> None:
    """Raise unless the hooked outputs are `output_hidden_states` at every index but the last,
    and the last is what enters the final norm (whose output is `hidden_states[-1]`)."""
    import torch

    indices = range(n_indices(model))
    entering: list[torch.Tensor] = []
    handle = final_norm(model).register_forward_hook(lambda _m, inputs, _o: entering.append(inputs[0]))
    try:
        with torch.no_grad(), record_residuals(model, indices) as recorded:
            states = model(input_ids=input_ids, output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    if len(states) != len(indices):
        raise ValueError(f"{len(states)} hidden states but {len(indices)} residual modules")
    expected = [*states[:-1], entering[-1]]
    for index in indices:
        if not torch.allclose(recorded[index], expected[index], atol=atol):
            raise ValueError(f"residual index {index}: the hooked output is not the residual stream there")


# --- contrasts measured under hooks ---------------------------------------------------

Around = Callable[[list[int], "torch.Tensor"], AbstractContextManager[Any]]


def contrast_logit_diffs(
    model: Any,
    tokenizer: Any,
    contrasts: Sequence[Contrast],
    batch_size: int = 16,
    around: Around | None = None,
) -> torch.Tensor:
    """[n] float32 logit(true token) - logit(false token) at each contrast's decision token.

    `around(rows, decision)` (the batch's contrast indices and their decision positions in
    the right-padded batch) returns a context entered around that batch's forward pass:
    how patching puts each row's own activation at its own position, and how a caller
    records activations batch by batch. Hooks set up outside this call apply to every batch.
    """
    import torch

    from harness.lab.scoring import last_token_indices, right_pad

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = torch.empty(len(contrasts), dtype=torch.float32)
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(contrasts), batch_size):
            rows = list(range(start, min(start + batch_size, len(contrasts))))
            sequences = [contrasts[i].prompt_ids for i in rows]
            input_ids, mask = right_pad(tokenizer, sequences)
            last = last_token_indices(input_ids, mask, sequences)
            with around(rows, last) if around else nullcontext():
                logits = model(
                    input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False
                ).logits
            at = logits[torch.arange(len(rows), device=device), last.to(device)].float()
            true = torch.tensor([contrasts[i].true_id for i in rows], device=device)
            false = torch.tensor([contrasts[i].false_id for i in rows], device=device)
            out[rows] = (at.gather(1, true[:, None]) - at.gather(1, false[:, None])).squeeze(1).cpu()
    return out
