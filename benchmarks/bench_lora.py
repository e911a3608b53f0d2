"""Benchmark of LoRA continued pretraining: packed blocks against one padded document per row.

    python benchmarks/bench_lora.py [--steps 20] [--repeats 3] [--max-length 256] [--threads N] ...

Builds a small random-weight Llama and a BPE tokenizer trained in a second, generates
documents of varied length (log-normal, a few to several hundred tokens), and trains the
same number of optimizer steps on them with `harness.lab.training` (the loop `finetune_lora`
uses) in both modes. Prints real (non-pad) training tokens per second for each and their
ratio: padding spends compute on pad positions, packing does not. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from harness.lab.training import Sequences, TrainConfig, pack, pad, seeded, train, with_eos

SYLLABLES = "zor plim dax gra vi ty qua ren mo lek su tan ob ir na".split()


def make_documents(n: int, rng: random.Random) -> list[str]:
    """Made-up words; document lengths log-normal (median ~67 words, p90 ~190, capped at 600)."""
    words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 3))) for _ in range(300)]
    docs = []
    for _ in range(n):
        length = max(3, min(600, int(rng.lognormvariate(4.2, 0.8))))
        text = " ".join(rng.choice(words) for _ in range(length))
        docs.append(text.capitalize() + ".")
    return docs


def build_model(directory: Path, docs: list[str], hidden: int, layers: int, max_length: int):
    """A tokenizer trained on the documents and a random Llama saved next to it (as a `base`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<pad>", "<eos>"]
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=specials, initial_alphabet=alphabet)
    tok.train_from_iterator(docs, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max_length,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with seeded(0):
        LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return tokenizer


def lora_model(directory: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = AutoModelForCausalLM.from_pretrained(directory)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=targets))


def timed_run(directory: Path, rows: Sequences, config: TrainConfig, seed: int) -> tuple[float, int, int]:
    """(loop seconds, real tokens, all positions incl. pads) for one training run on `rows`."""
    with seeded(seed):
        model = lora_model(directory)
        result = train(model, rows, config, seed=seed, device="cpu")
    return result.seconds, result.tokens_seen, rows.input_ids.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode, interleaved (default 3)")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per row (default 256)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per step (default 8)")
    parser.add_argument("--hidden", type=int, default=128, help="model width (default 128)")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks (default 4)")
    parser.add_argument("--docs", type=int, default=2000, help="documents generated (default 2000)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)  # this process only: steadier figures on a shared machine

    print(
        f"LoRA training benchmark: Python {platform.python_version()}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, {opts.repeats} repeats, medians"
    )
    docs = make_documents(opts.docs, random.Random(0))
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        directory = Path(tmp)
        tokenizer = build_model(directory, docs, opts.hidden, opts.layers, opts.max_length)
        encoded = with_eos(tokenizer(docs, verbose=False)["input_ids"], tokenizer.eos_token_id)
        lengths = sorted(map(len, encoded))
        n_rows = opts.steps * opts.batch_size  # exactly `steps` optimizer steps in one epoch
        packed, _ = pack(encoded, opts.max_length)
        padded, _ = pad(encoded, opts.max_length, tokenizer.pad_token_id)
        if len(packed) < n_rows or len(padded) < n_rows:
            sys.exit(f"{len(packed)} packed / {len(padded)} padded rows, need {n_rows}: raise --docs")
        modes = {
            name: Sequences(rows.input_ids[:n_rows], rows.attention_mask[:n_rows], rows.labels[:n_rows])
            for name, rows in (("packing", packed), ("padding", padded))
        }
        print(
            f"{len(docs)} documents, tokens each (with EOS): median {statistics.median(lengths):.0f}, "
            f"p90 {lengths[int(0.9 * len(lengths))]}, max {lengths[-1]}; "
            f"model hidden {opts.hidden} x {opts.layers} layers, vocab {len(tokenizer)}; "
            f"{opts.steps} steps of {opts.batch_size} rows x {opts.max_length} tokens"
        )
        config = TrainConfig(learning_rate=2e-4, batch_size=opts.batch_size, warmup_ratio=0.03)
        timed_run(directory, modes["packing"], config, seed=0)  # warm-up: imports, allocator, kernels
        samples: dict[str, list[tuple[float, int, int]]] = {name: [] for name in modes}
        for repeat in range(opts.repeats):
            for name, rows in modes.items():
                samples[name].append(timed_run(directory, rows, config, seed=repeat))

    widths = (11, 15, 10, 10, 7)

    def line(name: str, *cells: str) -> str:
        return f"  {name:<8}" + "".join(f"  {c:>{w}}" for c, w in zip(cells, widths, strict=True))

    print("\n" + line("mode", "real tok/s", "(min-max)", "all pos/s", "real share", "s/step"))
    rates = {}
    for name, runs in samples.items():
        real_rates = [real / seconds for seconds, real, _ in runs]
        rates[name] = statistics.median(real_rates)
        spread = f"{min(real_rates):,.0f}-{max(real_rates):,.0f}"
        positions = statistics.median(total / seconds for seconds, _, total in runs)
        per_step = statistics.median(seconds for seconds, _, _ in runs) / opts.steps
        share = runs[0][1] / runs[0][2]
        cells = (f"{rates[name]:,.0f}", spread, f"{positions:,.0f}", f"{share:.1%}", f"{per_step:.3f}")
        print(line(name, *cells))
    print(f"\npacking / padding, real tokens per second: {rates['packing'] / rates['padding']:.2f}x")


if __name__ == "__main__":
    main()
