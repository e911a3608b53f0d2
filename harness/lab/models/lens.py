"""TransformerLens bridges of a base model, and of base + a LoRA adapter merged into it.

TransformerLens 4.x has no `HookedTransformer`: a `TransformerBridge` wraps the Hugging
Face module itself (`boot_transformers(..., hf_model=...)`), with the raw HF weights (no
LayerNorm folding, no centering), so its logits match the HF model's. The bridge
replaces the model's submodules in place: the HF model passed in is not usable on its own
afterwards. torch, transformers, peft and transformer_lens are imported inside the
functions: stage kinds import this module at collection.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.lab.models.base import adapter_errors, resolve_base

if TYPE_CHECKING:
    import torch
    from transformer_lens.model_bridge import TransformerBridge


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def untie_output_embeddings(model: Any) -> bool:
    """Give the output embedding (lm_head) its own copy of a weight tied to the input
    embedding; whether it was tied.

    Merging a LoRA on lm_head (or on the embedding) into a tied weight writes the delta
    into both, so the merged model would read its inputs through the finetuned head too,
    and differ from the PeftModel it was merged from (peft warns about it, see
    huggingface/peft#2777). Untied first, the merge changes only the module it targets.
    """
    import torch

    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is None or outputs is None or outputs.weight is not inputs.weight:
        return False
    outputs.weight = torch.nn.Parameter(outputs.weight.detach().clone())
    model.config.get_text_config().tie_word_embeddings = False  # nothing re-ties it later
    return True


def load_hf_model(
    base: str, adapter: Path | None = None, dtype: torch.dtype | None = None, device: str | None = None
) -> Any:
    """The HF causal LM of `base` in eval mode, with `adapter` merged into its weights if given.

    Eager attention: the bridge switches to it anyway (its attention hooks need the
    pattern), and loading with it keeps a reference model numerically alike.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_base(base)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype or torch.float32, attn_implementation="eager"
    )
    if adapter is not None:
        from peft import PeftModel

        untie_output_embeddings(model)
        with adapter_errors(base, adapter):
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.to(device or _default_device()).eval()


def load_bridge(
    base: str, adapter: Path | None = None, dtype: torch.dtype | None = None, device: str | None = None
) -> TransformerBridge:
    """A TransformerLens bridge of `base`, or of `base` with `adapter` merged (see
    `load_hf_model`). The config and tokenizer always come from the base directory."""
    import torch
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    device = device or _default_device()
    path = resolve_base(base)
    model = load_hf_model(base, adapter, dtype, device)
    # TL reads the tokenizer's name_or_path, which only a tokenizer loaded from disk has;
    # a fresh instance, because the bridge reconfigures the one it gets (padding, BOS).
    tokenizer = AutoTokenizer.from_pretrained(path)
    bridge = TransformerBridge.boot_transformers(
        str(path), hf_model=model, tokenizer=tokenizer, device=device, dtype=dtype or torch.float32
    )
    return bridge.eval()
