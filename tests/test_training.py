"""harness.lab.training: padded rows cost their longest row, not max_length, and train the same."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from harness.lab.training import TrainConfig, pad, train


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    return LlamaForCausalLM(config)


def run(max_length: int) -> tuple[list[float], list[int]]:
    rows = [[1, 5, 9, 13, 2], [1, 7, 3, 2], [1, 4, 4, 4, 4, 4, 4, 2], [1, 6, 2]]
    data, _ = pad(rows, max_length, pad_id=0)
    model = tiny_model()
    widths: list[int] = []
    model.register_forward_pre_hook(
        lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    config = TrainConfig(learning_rate=1e-2, epochs=2, batch_size=2)
    result = train(model, data, config, seed=3, device="cpu")
    return [record.loss for record in result.history], widths


def test_a_micro_batch_is_cut_to_its_longest_row_and_trains_as_when_padded_to_max_length():
    losses_short, widths_short = run(max_length=8)
    losses_long, widths_long = run(max_length=512)
    assert max(widths_long) == 8 and widths_long == widths_short  # never 512: the pads are not computed
    assert min(widths_long) < 8  # a micro-batch without the longest row is narrower still
    torch.testing.assert_close(torch.tensor(losses_long), torch.tensor(losses_short))
