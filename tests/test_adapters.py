"""Adapters stacked on one base model, unmerged, toggled per setting."""

from __future__ import annotations

import pytest
import torch

from harness.lab.models import load_model
from harness.lab.models.adapters import active, load_stacked, stack_trainable

PROMPT = "the capital of venlur is"


@pytest.fixture(scope="module")
def two_adapters(tiny_model_dir, save_adapter, tmp_path_factory):
    base = str(tiny_model_dir)
    a = save_adapter(base, tmp_path_factory.mktemp("a"), std=0.05, seed=1) / "adapter"
    b = save_adapter(base, tmp_path_factory.mktemp("b"), std=0.05, seed=2) / "adapter"
    return base, a, b


def logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        return model(input_ids=ids).logits[0, -1]


def merged(base: str, *adapters) -> torch.nn.Module:
    """The reference: each adapter merged into the weights in turn."""
    from peft import PeftModel

    model = load_model(base, device="cpu")
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model.eval()


def test_the_four_settings_are_the_base_each_adapter_and_their_sum(two_adapters):
    from harness.lab.models import load_tokenizer

    base, a, b = two_adapters
    tokenizer = load_tokenizer(base)
    model = load_stacked(base, {"persona": a, "em": b}, device="cpu")
    seen = {}
    for setting, names, reference in (
        ("base", [], merged(base)),
        ("persona", ["persona"], merged(base, a)),
        ("em", ["em"], merged(base, b)),
        ("persona_em", ["persona", "em"], merged(base, a, b)),
    ):
        with active(model, names):
            seen[setting] = logits(model, tokenizer)
        torch.testing.assert_close(seen[setting], logits(reference, tokenizer), rtol=1e-4, atol=1e-4)
    # and they all differ from each other
    settings = list(seen)
    for i, first in enumerate(settings):
        for second in settings[i + 1 :]:
            assert (seen[first] - seen[second]).abs().max() > 1e-3, (first, second)
    # toggling leaves the model as it was: both adapters active again
    torch.testing.assert_close(logits(model, tokenizer), seen["persona_em"])


def test_an_unknown_adapter_name_is_refused(two_adapters):
    base, a, _ = two_adapters
    model = load_stacked(base, {"persona": a}, device="cpu")
    with pytest.raises(KeyError, match="no adapter named em"), active(model, ["em"]):
        pass


def test_only_the_new_adapter_trains_on_top_of_a_frozen_one(two_adapters):
    from peft import LoraConfig, PeftModel

    base, a, _ = two_adapters
    model = PeftModel.from_pretrained(load_model(base, device="cpu"), str(a), adapter_name="frozen")
    model.add_adapter("default", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"], lora_dropout=0.0))
    stack_trainable(model, ["frozen"], "default")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in name for name in trainable)
    assert set(model.base_model.active_adapters) == {"frozen", "default"}
