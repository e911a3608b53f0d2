"""Benchmark of MCQ evaluation: items/s of letter and continuation scoring, batch 1 vs 16.

    python benchmarks/bench_mcq.py [--items 200] [--repeats 3] [--batch-sizes 1 16] [--threads N]
                                   [--random | --tiny-world-dir DIR]

Scores the same items with `harness.lab.scoring.score_mcqs` (what the `mcq_compare` stage
runs, once per model) at each batch size; the baseline is batch size 1 in the same run.
The model is the tiny world (`harness.fixtures.tiny_world.build()`, built and cached on first use)
unless `--random` is given or it cannot be built: then a random-weight Llama of the same
shape with a BPE tokenizer trained on the items. Checks that every batch size gives the
same predictions. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from harness.lab.mcq import MCQ, format_item
from harness.lab.models import load_model, load_tokenizer
from harness.lab.scoring import CONTINUATION, LETTER, score_mcqs

SYLLABLES = "zor plim dax gra vi ty qua ren mo lek su tan ob ir na".split()


def tiny_world_items(n: int, directory: str | None = None) -> tuple[str, list[MCQ]]:
    """The tiny world's directory (built unless given) and `n` MCQs on its facts."""
    from harness.fixtures import tiny_world

    if directory is None:
        directory = str(tiny_world.build(log=lambda line: print(f"  tiny world: {line}", file=sys.stderr)))
    world = tiny_world.make_world()
    rng = random.Random(0)
    facts = (world.facts * (n // len(world.facts) + 1))[:n]
    return directory, [tiny_world.as_mcq(fact, rng) for fact in facts]


def synthetic_items(n: int, rng: random.Random) -> list[MCQ]:
    """Capital-of questions on made-up names, four options each, answers spread over A-D."""

    def name() -> str:
        return "".join(rng.choices(SYLLABLES, k=rng.randint(2, 3)))

    items = []
    for i in range(n):
        options = {letter: f"the city of {name()}" for letter in "ABCD"}
        answer = "ABCD"[i % 4]
        items.append(MCQ(f"q{i}", f"the capital of {name()} is", options, answer, answer, "nonconflict_easy"))
    return items


def random_model(directory: Path, items: list[MCQ]) -> str:
    """A BPE tokenizer trained on the items and a random Llama shaped like the tiny world's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [format_item(item, item.true_answer) for item in items] * 3
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<pad>", "<eos>"]
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=specials, initial_alphabet=alphabet)
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    tokenizer.save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return str(directory)


def measure(
    model, tokenizer, items: list[MCQ], mode: str, batch_size: int, repeats: int
) -> tuple[float, list[str]]:
    """Median items/s over `repeats` timed runs after one warm-up, and the predictions."""
    result = score_mcqs(model, tokenizer, items, mode, batch_size)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        score_mcqs(model, tokenizer, items, mode, batch_size)
        rates.append(len(items) / (time.perf_counter() - start))
    return statistics.median(rates), [max(s.probs, key=s.probs.__getitem__) for s in result]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--random", action="store_true", help="random weights instead of the tiny world")
    parser.add_argument("--tiny-world-dir", help="a tiny world already built: fixtures/tiny_world.py DIR")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        source = "random weights, tokenizer trained on the items"
        base = None
        if not args.random:
            try:
                base, items = tiny_world_items(args.items, args.tiny_world_dir)
                source = f"tiny world ({base})"
            except Exception as error:  # a benchmark should still measure something
                print(f"tiny world unavailable ({type(error).__name__}: {error}); using random weights")
        if base is None:
            items = synthetic_items(args.items, random.Random(0))
            base = random_model(Path(tmp), items)
        tokenizer = load_tokenizer(base)
        model = load_model(base, device="cpu")
        n_params = sum(p.numel() for p in model.parameters())

        print(f"model: {source}; {n_params / 1e6:.2f}M parameters")
        print(
            f"{len(items)} items, {args.repeats} timed repeats (median), CPU: {os.cpu_count()} cores, torch "
            f"{torch.__version__} with {torch.get_num_threads()} threads, Python {platform.python_version()}"
        )
        print(f"{'scoring':<13} {'batch':>5} {'items/s':>9} {'vs batch ' + str(args.batch_sizes[0]):>11}")
        for mode in (LETTER, CONTINUATION):
            baseline, reference = None, None
            for batch_size in args.batch_sizes:
                rate, predictions = measure(model, tokenizer, items, mode, batch_size, args.repeats)
                baseline = baseline or rate
                reference = reference or predictions
                same = sum(a == b for a, b in zip(predictions, reference, strict=True))
                note = "" if same == len(items) else f"  ({len(items) - same} predictions differ!)"
                print(f"{mode:<13} {batch_size:>5} {rate:>9.1f} {rate / baseline:>10.2f}x{note}")


if __name__ == "__main__":
    main()
