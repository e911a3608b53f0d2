"""Resolve a spec's `base:` to a directory of weights, and load it.

`base` is one of:
- `fixture:<name>`: a model built by code (`fixture:tiny-world`, `fixture:tiny-chat`, and the
  random stand-ins of rehearsals `fixture:llama3-stand-in`, `fixture:qwen2-stand-in`), cached
  by recipe hash;
- a local directory holding a `save_pretrained` model and tokenizer;
- a Hugging Face id (`meta-llama/Llama-3.1-8B-Instruct`) already in the local HF cache.
Nothing is downloaded: this machine may have no network, and a run should not
silently fetch 16 GB.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness.core.progress import Progress, aside, duration
from harness.core.stage import StageError

FIXTURE_PREFIX = "fixture:"
TINY_HINT = "To run the same pipeline on CPU without it, add `--profile tiny`."


class ModelNotFound(Exception):
    """The base model is not on this machine; the message says how to get it."""


class NotDownloaded(ModelNotFound):
    """A Hugging Face model that is not in the local cache: `advice` says how to fetch it."""

    def __init__(self, model: str):
        self.model = model
        self.advice = download_advice(model)
        super().__init__(f"{self.advice}. {TINY_HINT}")


GATED_MODELS = Path(__file__).resolve().parents[3] / "data" / "gated_models.txt"


def download_advice(model: str) -> str:
    """How to fetch `model` into the local cache: `hf download`, after accepting its license
    when it is gated (data/gated_models.txt)."""
    advice = (
        f"base model {model!r} is not in the local Hugging Face cache and nothing is downloaded at "
        f"run time: fetch it first with `hf download {model}`, or name a local directory"
    )
    globs = [line.strip() for line in GATED_MODELS.read_text(encoding="utf-8").splitlines()]
    if any(fnmatch.fnmatch(model, glob) for glob in globs if glob and not glob.startswith("#")):
        advice += (
            f"; it is gated: accept its license on https://huggingface.co/{model} and log in with "
            "`hf auth login` before downloading"
        )
    return advice


def _fixtures() -> dict[str, Any]:
    from harness.fixtures import stand_ins, tiny_chat, tiny_world

    return {"tiny-world": tiny_world, "tiny-chat": tiny_chat, **stand_ins.STAND_INS}


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
        return _built(base)
    return _local_dir(base)


def _built(base: str, clock: Callable[[], float] = time.perf_counter) -> Path:
    """A fixture model's directory, built first if it is not cached: on its own progress
    lines, its time left out of the duration of the stage that asked (`aside`)."""
    from harness.core.paths import cache_dir

    where = f"(once, cached in {cache_dir()})"
    with aside(clock) as log:
        started = clock()
        build_log = FixtureBuildLog(log, f"building {base}", where, clock)
        path = _fixtures()[base[len(FIXTURE_PREFIX) :]].build(log=build_log)
        took = clock() - started
        if build_log.building:
            log(f"building {base} {where}: done in {duration(took)}")
        elif took > 1:  # no line of its own: another process built it while this one waited
            log(f"waited {duration(took)} for another process building {base} {where}")
    return path


class FixtureBuildLog:
    """The log a fixture's `build` writes to: its `step N/M loss L` lines become progress
    lines with a rate and the time left under `what`, the others go to `log` under `what`
    and `where`."""

    STEP = re.compile(r"\bstep (\d+)/(\d+) loss (\S+)")

    def __init__(self, log: Callable[[str], None], what: str, where: str, clock: Callable[[], float]):
        self.log, self.what, self.where = log, what, where
        self.progress = Progress(log, what, "steps", clock=clock)
        self.building = False

    def __call__(self, line: str) -> None:
        self.building = True
        step = self.STEP.search(line)
        if step:  # logged after optimizer step N (counted from 0) of M
            self.progress(int(step[1]) + 1, int(step[2]), f"loss {step[3]}")
        else:
            self.log(f"{self.what} {self.where}: {line}")


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
        raise NotDownloaded(base) from None


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
