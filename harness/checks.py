"""Collection-time checks that model stages share: the base model is here, the MCQ file
reads, and the cache key follows the base's weights."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.mcq import MCQ, load_mcqs
from harness.models import ModelNotFound, base_fingerprint, check_base
from harness.stage import ParamError, StageError


def check_base_param(params: Mapping[str, Any]) -> None:
    """A base model missing here fails at collection, in seconds, at the `base:` line."""
    try:
        check_base(params["base"])
    except ModelNotFound as error:
        raise ParamError(("base",), str(error)) from None


def mcqs_param(params: Mapping[str, Any], spec_dir: Path, conflict_for: str | None = None) -> list[MCQ]:
    """The MCQ file's items; a bad row fails at the `mcqs:` line. `conflict_for` names
    what needs conflict items, when the stage measures only those."""
    path = (spec_dir / params["mcqs"]).resolve()
    if not path.is_file():
        raise ParamError(("mcqs",), f"MCQ file not found: {params['mcqs']} (looked for {path})")
    try:
        items = load_mcqs(path)
    except StageError as error:
        raise ParamError(("mcqs",), str(error)) from None
    if conflict_for and not any(item.true_answer != item.false_answer for item in items):
        raise ParamError(("mcqs",), f"{path}: no conflict questions; {conflict_for} is measured on them")
    return items


def questions_param(params: Mapping[str, Any], spec_dir: Path) -> None:
    """An EM questions file that does not load fails at the `questions:` line (a missing
    one is reported by the input-path check)."""
    from harness.em_data import load_questions

    path = spec_dir / str(params["questions"])
    if path.is_file():
        try:
            load_questions(path)
        except StageError as error:
            raise ParamError(("questions",), str(error)) from None


def provider_param(params: Mapping[str, Any], key: str) -> None:
    """A provider that cannot work here (e.g. its key is not set) fails at its line."""
    from harness.llm import ProviderConfigError, check_provider

    try:
        check_provider(params[key])
    except ProviderConfigError as error:
        raise ParamError((key,), str(error)) from None


def em_params(params: Mapping[str, Any], spec_dir: Path) -> None:
    """The collection checks of the stages that measure EM: base model, questions, judge."""
    check_base_param(params)
    questions_param(params, spec_dir)
    provider_param(params, "judge")


def base_weights(params: Mapping[str, Any]) -> str:
    """The fingerprint of the base model's weights on this machine (a fixture's recipe hash, a
    directory's listing), so results of replaced weights are not reused."""
    return base_fingerprint(params["base"])
