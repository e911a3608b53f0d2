"""A rehearsal: a spec's real profile run on CPU against stand-ins, without editing the spec.

`pytest experiments/cubic_gravity.yaml --rehearse` runs every stage of the profile as written
(params, formats, chat templates, scoring modes), with three things replaced after the profile
merge, each recorded (printed when the experiment starts, and in every report):

- every Hugging Face base model by a random-initialised stand-in of its architecture family
  and chat template (harness.fixtures.stand_ins: a Llama-3-style and a Qwen2-style model with
  the real number of layers and a tokenizer trained by code);
- every API provider (generator, teacher, judge, samplers, fine-tuning API) by the scripted
  OpenAI-compatible server each process starts on 127.0.0.1 (`rehearsal://llm/<the script's
  code version>`, harness.fixtures.rehearsal_llm): plausible answers over real HTTP, judge
  logprobs included;
- the sizes a kind's schema marks `x-size` (documents, samples per question, epochs,
  permutations) by a factor (`--rehearse-scale`, default 0.05), rounded up and kept within the
  schema's minimum.

The models are random, so gates and hypotheses are reported, never required: a rehearsal fails
only where a stage cannot complete or leaves out a file its kind declares (`x-files`). Its runs
are stored apart (`runs/<experiment>/default.rehearsal/`): a real run never reuses them. A
profile that already uses a fixture model or the offline provider is refused, since rehearsing
it would run the tiny paths, not the real ones.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from harness.core.stage import ParamError, StageKind
from harness.fixtures.rehearsal_llm import KEY_ENV, version
from harness.lab.llm import REHEARSAL_SCHEME
from harness.lab.models.base import FIXTURE_PREFIX

DEFAULT_SCALE = 0.05

# architecture families by a word of the model's name: (stand-in, what it mirrors)
STAND_INS = {
    "llama": (f"{FIXTURE_PREFIX}llama3-stand-in", "Llama-3 (32 layers, GQA, llama3 rope scaling)"),
    "qwen": (f"{FIXTURE_PREFIX}qwen2-stand-in", "Qwen2 (28 layers, GQA, q/k/v bias)"),
}


def stand_in(base: str) -> str:
    """The stand-in for a base model named by its Hugging Face id or a local directory."""
    config = Path(base).expanduser() / "config.json"
    # a local directory by its architecture, whatever it is called
    name = (config.read_text(encoding="utf-8") if config.is_file() else base).lower()
    for word, (model, _) in STAND_INS.items():
        if word in name:
            return model
    families = ", ".join(f"{word} ({what})" for word, (_, what) in STAND_INS.items())
    raise ParamError((), f"no rehearsal stand-in for base model {base!r}: stand-ins exist for {families}")


class Rehearsal:
    """The rewrite of each stage's params (harness.core.experiment.Rewrite) that makes a
    profile its rehearsal, and the record of what it replaced."""

    label = "rehearsal"

    def __init__(self, scale: float = DEFAULT_SCALE):
        self.scale = scale
        # the script's code version in the URL: the stages' keys and cached answers change with it
        self.url = f"{REHEARSAL_SCHEME}llm/{version()}"
        self.bases: dict[str, dict[str, Any]] = {}  # real -> {stand_in, stages}
        self.providers: list[dict[str, str]] = []  # {stage, param, was}
        self.sizes: list[dict[str, Any]] = []  # {stage, param, was, now}

    def __call__(self, stage: str, kind: StageKind, params: dict[str, Any]) -> dict[str, Any]:
        params = copy.deepcopy(params)
        if kind.base and isinstance(params.get(kind.base), str):
            params[kind.base] = self._base(stage, kind.base, params[kind.base])
        for path, provider in _providers(params):
            self._provider(stage, path, provider)
        self._scale(stage, params, kind.schema, ())
        return params

    def _scale(
        self, stage: str, params: dict[str, Any], schema: Mapping[str, Any], at: tuple[str, ...]
    ) -> None:
        """Scale the params `schema` marks `"x-size": true` (in nested objects too): counts
        rounded up, times (finetune_api's poll interval) as they are; never below the minimum."""
        for name, prop in (schema.get("properties") or {}).items():
            value = params.get(name)
            if isinstance(value, dict) and isinstance(prop, dict):
                self._scale(stage, value, prop, (*at, name))
            if not (isinstance(prop, dict) and prop.get("x-size")) or not isinstance(value, (int, float)):
                continue
            now = value * self.scale
            now = max(prop.get("minimum", 1), math.ceil(now)) if isinstance(value, int) else now
            if now != value:
                where = ".".join((*at, name))
                self.sizes.append({"stage": stage, "param": where, "was": value, "now": now})
                params[name] = now

    def _base(self, stage: str, param: str, base: str) -> str:
        if base.startswith(FIXTURE_PREFIX):
            raise ParamError(
                (param,), f"{base} is a fixture model: a rehearsal runs a profile with real base models"
            )
        model = stand_in(base)
        self.bases.setdefault(base, {"stand_in": model, "stages": []})["stages"].append(stage)
        return model

    def _provider(self, stage: str, path: tuple[str | int, ...], provider: dict[str, Any]) -> None:
        where = ".".join(map(str, path))
        if provider.get("name") == "offline":
            raise ParamError(path, "the offline provider: a rehearsal runs a profile with real API providers")
        model = f" {provider['model']}" if provider.get("model") else ""
        was = f"{provider.get('name')}{model} at {provider.get('base_url', 'its default URL')}"
        self.providers.append({"stage": stage, "param": where, "was": was})
        provider["base_url"] = self.url
        provider["api_key_env"] = KEY_ENV

    def record(self) -> dict[str, Any]:
        """What this rehearsal replaced: for reports (report.json's `rehearsal`) and the terminal."""
        return {
            "scale": self.scale,
            "bases": {base: dict(what) for base, what in self.bases.items()},
            "providers": list(self.providers),
            "sizes": list(self.sizes),
        }

    def lines(self) -> list[str]:
        """The record in words, for the terminal."""
        lines = [f"rehearsal: random stand-ins, scripted answers, sizes x{self.scale:g}; gates not required"]
        for base, what in self.bases.items():
            lines.append(f"  {base} -> {what['stand_in']} (random weights) in {len(what['stages'])} stages")
        if self.providers:
            stages = len({p["stage"] for p in self.providers})
            lines.append(f"  {len(self.providers)} providers in {stages} stages -> {self.url}, scripted")
        for size in self.sizes:
            lines.append(f"  {size['stage']}.{size['param']}: {size['was']} -> {size['now']}")
        return lines


def prepare_environment() -> None:
    """The key the rewritten providers name: the scripted server reads none, but the
    providers' checks insist on a key, as they must for real ones."""
    os.environ.setdefault(KEY_ENV, "rehearsal")


def _providers(value: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], dict]]:
    """Every provider mapping in a stage's params (`provider`, `judge`, settings' samplers):
    a mapping with a provider `name` and, for API ones, the variable of its key."""
    if isinstance(value, dict):
        if isinstance(value.get("name"), str) and ("api_key_env" in value or value.get("name") == "offline"):
            yield path, value
            return
        for key, item in value.items():
            yield from _providers(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _providers(item, (*path, index))
