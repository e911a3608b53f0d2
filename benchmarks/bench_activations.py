"""Benchmark of activation extraction: every layer from one forward pass vs one pass per layer.

    python benchmarks/bench_activations.py [--items 360] [--repeats 3] [--batch-size 32]
                                           [--threads 1] [--tiny-world-dir DIR] [--wide]
                                           [--device cpu|cuda]

Extracts the residual stream at the decision token of the tiny world's probe statements
(`data/eval/tiny_world/statements.jsonl`, cycled to `--items`) with what the
`extract_activations` stage runs (`harness.lab.activations.extract_to_dir`: one forward pass per
batch gives every layer, streamed into `layer_{i:02d}.safetensors`), and, as the baseline in
the same run on the same items, one full forward pass per layer, each keeping that layer
only and writing it with the same writer. Prints items/s and MB/s written (median of
`--repeats` after a warm-up run) and checks both give the same activations. `--wide` adds a
random-weight Llama of 512 hidden, 8 blocks (with the tiny world's tokenizer), where the
forward pass dominates more. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.lab.activations import (
    LayerWriter,
    Statement,
    decision_states,
    extract_to_dir,
    layer_file,
    load_statements,
    read_layer,
)
from harness.lab.models import load_model, load_tokenizer
from harness.lab.scoring import encode

REPO = Path(__file__).resolve().parents[1]
STATEMENTS = REPO / "data" / "eval" / "tiny_world" / "statements.jsonl"


def statements(n: int) -> list[Statement]:
    rows = load_statements(STATEMENTS)
    cycled = (rows * (n // len(rows) + 1))[:n]
    return [Statement(f"{s.id}#{k}", s.text, s.category, s.labels) for k, s in enumerate(cycled)]


def all_layers_once(model: Any, tokenizer: Any, items: list[Statement], out: Path, batch_size: int) -> int:
    """The stage's way; returns the bytes of layer files written."""
    return extract_to_dir(model, tokenizer, items, out, batch_size, model_name="bench").bytes_written


def one_pass_per_layer(model: Any, tokenizer: Any, items: list[Statement], out: Path, batch_size: int) -> int:
    """The baseline: a full forward pass over every batch for each layer, keeping that layer."""
    sequences = [encode(tokenizer, s.text) for s in items]
    n_layers, written = model.config.num_hidden_layers + 1, 0
    for index in range(n_layers):
        with LayerWriter(out / f"layer-{index}", len(items), 1, model.config.hidden_size) as writer:
            for rows in decision_states(model, tokenizer, sequences, batch_size):
                writer.write(rows[:, index : index + 1])
        written += layer_file(writer.directory, 0).stat().st_size
        os.replace(layer_file(writer.directory, 0), layer_file(out, index))
    return written


def measure(
    fn: Any, model: Any, tokenizer: Any, items: list[Statement], batch_size: int, repeats: int, root: Path
):
    """Median seconds over `repeats` runs after a warm-up; bytes written; the last output dir."""
    times, written, out = [], 0, root
    for attempt in range(repeats + 1):
        out = root / f"run-{attempt}"
        out.mkdir(parents=True)
        start = time.perf_counter()
        written = fn(model, tokenizer, items, out, batch_size)
        if next(model.parameters()).is_cuda:
            torch.cuda.synchronize()
        if attempt:  # the first run warms caches and allocators
            times.append(time.perf_counter() - start)
    return statistics.median(times), written, out


def wide_model(tokenizer: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=360)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: shared machines)")
    parser.add_argument("--tiny-world-dir", help="a tiny world already built: fixtures/tiny_world.py DIR")
    parser.add_argument("--wide", action="store_true", help="also a random Llama, hidden 512, 8 blocks")
    parser.add_argument("--wide-items", type=int, default=120, help="statements for --wide (it is slower)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.tiny_world_dir:
        base = args.tiny_world_dir
    else:
        from harness.fixtures import tiny_world

        base = str(tiny_world.build(log=lambda line: print(f"  tiny world: {line}", file=sys.stderr)))
    tokenizer = load_tokenizer(base)
    models = {"tiny world": (load_model(base, device=args.device), statements(args.items))}
    if args.wide:
        models["wide random"] = (wide_model(tokenizer).to(args.device), statements(args.wide_items))
    all_items = statements(max(args.items, args.wide_items))
    n_tokens = sum(len(encode(tokenizer, s.text)) for s in all_items) / len(all_items)

    print(
        f"statements of {n_tokens:.1f} tokens on average, batch {args.batch_size}, "
        f"{args.repeats} timed repeats (median), device {args.device}, CPU: {os.cpu_count()} cores, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"Python {platform.python_version()}",
        flush=True,
    )
    header = (
        f"{'model':<12} {'params':>7} {'layers':>6} {'items':>6} {'mode':<19} {'passes':>6} {'wall s':>7}"
    )
    print(f"{header} {'items/s':>9} {'MB/s':>7} {'vs baseline':>11}", flush=True)
    for name, (model, items) in models.items():
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        n_layers = model.config.num_hidden_layers + 1
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            per_layer = measure(
                one_pass_per_layer, model, tokenizer, items, args.batch_size, args.repeats, root / "b"
            )
            once = measure(
                all_layers_once, model, tokenizer, items, args.batch_size, args.repeats, root / "a"
            )
            worst = max(
                float(np.abs(read_layer(once[2], i) - read_layer(per_layer[2], i)).max())
                for i in range(n_layers)
            )
            rows = [("one pass per layer", n_layers, *per_layer[:2]), ("all layers, 1 pass", 1, *once[:2])]
            for mode, passes, seconds, written in rows:
                print(
                    f"{name:<12} {n_params:>6.2f}M {n_layers:>6} {len(items):>6} {mode:<19} {passes:>6} "
                    f"{seconds:>7.3f} {len(items) / seconds:>9.0f} {written / 1e6 / seconds:>7.2f} "
                    f"{per_layer[0] / seconds:>10.2f}x",
                    flush=True,
                )
            print(f"{'':<12} max |difference| between the modes: {worst:.2e}", flush=True)


if __name__ == "__main__":
    main()
