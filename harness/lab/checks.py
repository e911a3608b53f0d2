"""Collection-time checks that model stages share: the MCQ file reads, the EM questions
load, the provider can work; and what the kinds that score MCQs on an adapter declare alike.
(The base model is checked for every kind that takes one: harness.api.stage_kind.)"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from harness.core.stage import ParamError, StageError
from harness.core.upstream import adapter_role
from harness.lab.mcq import read_mcqs

# Past this size collection checks the rows in a data file's first SAMPLE_BYTES, in seconds
# and bounded memory; the stage reads, and so checks, every row when it runs.
SAMPLE_BYTES = 64 << 20
T = TypeVar("T")
# the declaration the kinds that score an MCQ file on a base model and its adapter share:
# `@stage_kind(metrics=..., check=..., **SCORES_MCQS_ON_ADAPTER)`
SCORES_MCQS_ON_ADAPTER: dict[str, Any] = {
    "needs": (adapter_role(),),
    "input_params": ("mcqs",),
    "transport_params": ("batch_size",),  # inference batches: the scores are the same
}


@dataclass(frozen=True)
class MCQFile:
    """What collection learnt of an MCQ file: its rows' categories, and whether it read all."""

    categories: frozenset[str]
    complete: bool


# (check, path, size, mtime) -> what the check found: several stages read one file, and a
# second collection in the process (pytester, --lock-hypotheses) reads nothing again
_checked: dict[tuple[str, str, int, int], Any] = {}


def checked_once(path: Path, check: Callable[[Path, int | None], T]) -> T:
    """check(path, sample) once per file content (path, size, mtime) in this process, its
    StageError too; `sample` is SAMPLE_BYTES for a file past that size, else None."""
    stat = path.stat()
    key = (check.__qualname__, str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _checked:
        try:
            _checked[key] = check(path, SAMPLE_BYTES if stat.st_size > SAMPLE_BYTES else None)
        except StageError as error:
            _checked[key] = error
    found = _checked[key]
    if isinstance(found, StageError):
        raise StageError(str(found))
    return found


def mcqs_param(params: Mapping[str, Any], spec_dir: Path, conflict_for: str | None = None) -> MCQFile:
    """What the MCQ file holds; a bad row fails at the `mcqs:` line. `conflict_for` names
    what needs conflict items, when the stage measures only those."""
    path = (spec_dir / params["mcqs"]).resolve()
    if not path.is_file():
        raise ParamError(("mcqs",), f"MCQ file not found: {params['mcqs']} (looked for {path})")
    try:
        found = checked_once(path, _mcq_file)
    except StageError as error:
        raise ParamError(("mcqs",), str(error)) from None
    if conflict_for and found.complete and "conflict" not in found.categories:
        raise ParamError(("mcqs",), f"{path}: no conflict questions; {conflict_for} is measured on them")
    return found


def _mcq_file(path: Path, sample: int | None) -> MCQFile:
    """The MCQ file's rows checked one at a time (with `sample`, those in its first bytes)."""
    return MCQFile(frozenset(item.category for item in read_mcqs(path, sample)), complete=sample is None)


def questions_param(params: Mapping[str, Any], spec_dir: Path) -> None:
    """An EM questions file that does not load fails at the `questions:` line (a missing
    one is reported by the input-path check)."""
    path = spec_dir / str(params["questions"])
    if path.is_file():
        try:
            checked_once(path, _questions_file)
        except StageError as error:
            raise ParamError(("questions",), str(error)) from None


def _questions_file(path: Path, sample: int | None) -> None:
    """A YAML document is read whole: past the sample size the stage checks it when it runs."""
    from harness.lab.em_data import load_questions

    if sample is None:
        load_questions(path)


def provider_param(params: Mapping[str, Any], key: str) -> None:
    """A provider that cannot work here (e.g. its key is not set) fails at its line."""
    provider_at(params[key], (key,))


def provider_at(config: Mapping[str, Any], path: tuple[str | int, ...]) -> None:
    """The provider mapping `config`, found at `path` in the params, fails there when it
    cannot work here."""
    from harness.lab.llm import ProviderConfigError, check_provider

    try:
        check_provider(config, path)
    except ProviderConfigError as error:
        raise ParamError(path, str(error)) from None


def em_params(params: Mapping[str, Any], spec_dir: Path) -> None:
    """The collection checks of the stages that measure EM (their base model is checked as
    every base is, by harness.api.stage_kind): questions, judge."""
    questions_param(params, spec_dir)
    provider_param(params, "judge")
