"""Prompts kept in data files, so researchers edit them without touching code.

A prompt file is plain UTF-8 text with `{name}` slots for the variables a stage fills in;
every other character, braces included, is sent as written. A slot the stage does not
know is an error at collection naming the file and the line, not a literal `{typo}` sent
to a paid model a thousand times.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.core.jsonl import read_text
from harness.core.stage import StageError

_SLOT = re.compile(r"\{([A-Za-z_]\w*)\}")


@dataclass(frozen=True)
class PromptFile:
    path: Path
    text: str

    def fill(self, values: Mapping[str, Any]) -> str:
        return _SLOT.sub(lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), self.text)


def load_prompt(path: Path, slots: Collection[str]) -> PromptFile:
    """The prompt at `path`; a StageError at `file:line` for a slot not among `slots`."""
    text = read_text(path, "prompt file")
    if not text.strip():
        raise StageError(f"{path}: the prompt file is empty")
    for match in _SLOT.finditer(text):
        if match.group(1) not in slots:
            line = text.count("\n", 0, match.start()) + 1
            known = ", ".join("{" + s + "}" for s in sorted(slots))
            raise StageError(f"{path}:{line}: unknown slot {match.group(0)}; the slots are {known}")
    return PromptFile(path, text)
