"""Resolve a spec's `base:` to a directory of weights, and load it.

`base` is one of:
- `fixture:<name>`: a model built by code (`fixture:tiny-world`, `fixture:tiny-chat`), cached by recipe hash;
- a local directory holding a `save_pretrained` model and tokenizer;
- a Hugging Face id (`meta-llama/Llama-3.1-8B-Instruct`) already in the local HF cache.
Nothing is downloaded: this machine may have no network, and a run should not
silently fetch 16 GB.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness.core.stage import StageError

FIXTURE_PREFIX = "fixture:"
TINY_HINT = "To run the same pipeline on CPU without it, add `--profile tiny`."


class ModelNotFound(Exception):
    """The base model is not on this machine; the message says how to get it."""


def _fixtures() -> dict[str, Any]:
    from harness.fixtures import tiny_chat, tiny_world

    return {"tiny-world": tiny_world, "tiny-chat": tiny_chat}


def check_base(base: str) -> None:
    """Fast check (no loading, no building) that `base` can be resolved here."""
    if base.startswith(FIXTURE_PREFIX):
        name = base[len(FIXTURE_PREFIX) :]
        if name not in _fixtures():
            known = ", ".join(FIXTURE_PREFIX + n for n in _fixtures())
            raise ModelNotFound(f"unknown fixture model {base!r}; known: {known}")
        return
    _local_dir(base)


def resolve_base(base: str) -> Path:
    """The directory holding `base`'s config, weights and tokenizer (building a fixture)."""
    if base.startswith(FIXTURE_PREFIX):
        check_base(base)
        return _fixtures()[base[len(FIXTURE_PREFIX) :]].build()
    return _local_dir(base)


def base_fingerprint(base: str) -> str:
    """What identifies the weights for cache keys: a fixture's recipe hash; for a directory
    the names, sizes and modification times of its files (hashing gigabytes of weights at
    every collection would be too slow), so weights replaced in place rerun what used them."""
    if base.startswith(FIXTURE_PREFIX):
        check_base(base)
        return f"{base}@{_fixtures()[base[len(FIXTURE_PREFIX) :]].recipe_hash()}"
    try:
        path = _local_dir(base)
    except ModelNotFound:
        return base
    files = sorted(p for p in path.rglob("*") if p.is_file())
    listing = [(p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return f"{base}@{hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]}"


def _local_dir(base: str) -> Path:
    path = Path(base).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"base model directory {path} has no config.json (save_pretrained writes it)")
        return path
    if base.startswith((".", "/", "~")) or base.count("/") != 1:
        raise ModelNotFound(f"base model {base!r}: no such directory. {TINY_HINT}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(base, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise ModelNotFound(
            f"base model {base!r} is not in the local Hugging Face cache and nothing is downloaded "
            f"at run time; fetch it first (`huggingface-cli download {base}`) or name a local "
            f"directory. {TINY_HINT}"
        ) from None


def load_tokenizer(base: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_base(base))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(base: str, adapter: Path | None = None, dtype: Any = None, device: str | None = None):
    """The base model in eval mode, with `adapter` (a saved peft adapter) applied if given."""
    import torch
    from transformers import AutoModelForCausalLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(resolve_base(base), dtype=dtype or torch.float32)
    if adapter is not None:
        from peft import PeftModel

        with adapter_errors(base, adapter):
            model = PeftModel.from_pretrained(model, adapter)
    return model.to(device).eval()


@contextmanager
def adapter_errors(base: str, adapter: Path) -> Iterator[None]:
    """An adapter that does not fit the base (shapes, module names) is a user's error."""
    try:
        yield
    except (RuntimeError, ValueError, KeyError) as error:
        raise StageError(f"cannot apply the adapter {adapter} to {base}: {error}") from error
