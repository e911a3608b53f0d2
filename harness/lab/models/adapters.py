"""Several LoRA adapters on one base model, none merged, switched on and off at will.

A persona adapter and an EM adapter trained on top of it stay separate files; evaluation
loads both under their names and activates any subset (`active`): the base alone, either
adapter, or both, whose LoRA updates then add up in every layer they share. Training a
new adapter on top of frozen ones is `stack_trainable`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness.lab.models.base import adapter_errors, load_model


def load_stacked(
    base: str, adapters: Mapping[str, Path], dtype: Any = None, device: str | None = None
) -> Any:
    """The base model with every adapter of `adapters` (name -> saved adapter directory)
    loaded under its name, in eval mode, all of them active. At least one adapter."""
    if not adapters:
        raise ValueError("load_stacked needs at least one adapter; use load_model for the base alone")
    from peft import PeftModel

    names = list(adapters)
    first, *rest = names
    model = load_model(base, dtype=dtype, device=device)
    with adapter_errors(base, Path(adapters[first])):
        model = PeftModel.from_pretrained(model, str(adapters[first]), adapter_name=first)
    for name in rest:
        with adapter_errors(base, Path(adapters[name])):
            model.load_adapter(str(adapters[name]), adapter_name=name)
    model.base_model.set_adapter(names, inference_mode=True)
    return model.eval()


@contextmanager
def active(model: Any, names: Sequence[str]) -> Iterator[Any]:
    """`model` with exactly the adapters `names` active (none: the base model alone)."""
    unknown = sorted(set(names) - set(model.peft_config))
    if unknown:
        raise KeyError(f"no adapter named {', '.join(unknown)} (loaded: {', '.join(model.peft_config)})")
    if not names:
        with model.disable_adapter():
            yield model
        return
    previous = list(model.base_model.active_adapters)
    model.base_model.set_adapter(list(names), inference_mode=True)
    try:
        yield model
    finally:
        model.base_model.set_adapter(previous, inference_mode=True)


def stack_trainable(model: Any, frozen: Sequence[str], trainable: str) -> None:
    """Activate the frozen adapters and `trainable` together, with gradients for `trainable`
    only: the new adapter learns on top of the others, which stay as they were saved."""
    model.base_model.set_adapter([*frozen, trainable])  # marks every active adapter trainable
    marker = f".{trainable}."
    for name, parameter in model.named_parameters():
        parameter.requires_grad = marker in name and "lora_" in name
