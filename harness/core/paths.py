"""Where the harness keeps what outlives one run: the tiny world, LLM responses."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$HARNESS_CACHE_DIR`, else `~/.cache/harness`: shared by every checkout and run."""
    configured = os.environ.get("HARNESS_CACHE_DIR")
    root = Path(configured).expanduser() if configured else Path.home() / ".cache" / "harness"
    root.mkdir(parents=True, exist_ok=True)
    return root
