"""Answers sampled from one setting of an evaluation stage, wherever its model lives.

A setting (`harness.lab.settings`) is local adapters active on a base model, or a model a
provider serves; either way, and for every replicate of it, each question is answered `n`
times: locally by `harness.lab.em.sample_answers` (plain sampling at the temperature, seeded
per question), through a provider by `harness.lab.em.provider_answers` (one request per
answer, seeded from the stage's seed and the answer's index). Replicates number their samples
on from each other's, so every answer of a setting has its own (question, sample index). A
request that failed for good is kept as an answer with its error, never dropped.

`unit_samples` gives a setting's per-answer values their unit of replication for samples.json
(harness.core.samples): in a setting of replicates, the replicate (`r<i>:<its stages or model>`,
level "training run": answers of one training run share its weights); in a setting of one
model, each answer (`<its stages, base, or model id>:<question>#<sample>`, level "answer":
given the model, its answers are independent draws).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from harness.core.samples import SampleSet
from harness.core.stage import StageContext
from harness.lab.em import Answer, provider_answers, sample_answers
from harness.lab.em_data import Question
from harness.lab.settings import LocalModel, Setting, provider_model_id, replicate_label, replicates_of


@dataclass(frozen=True)
class Sampling:
    """How a stage draws its answers: `n` per question, at `temperature`, up to `max_new_tokens`;
    `batch_size` answers per local generate call; `seed`, the stage's."""

    n: int
    max_new_tokens: int
    temperature: float
    batch_size: int
    seed: int


@dataclass(frozen=True)
class SampledSetting:
    """One setting's answers per replicate; `labels[i]` names what replicate i ran (its stages
    or model id); `record` says where the answers came from, for a stage's results file."""

    record: dict[str, Any]
    labels: list[str]
    answers: list[list[Answer]]

    @property
    def n_unsampled(self) -> int:
        return sum(a.error is not None for mine in self.answers for a in mine)


def sample_local(
    ctx: StageContext,
    local: LocalModel,
    setting: str,
    value: Setting,
    questions: Sequence[Question],
    sampling: Sampling,
) -> SampledSetting:
    replicates = replicates_of(value)
    answers = []
    for number, roles in enumerate(replicates):
        shown = " + ".join(roles) or "the base model alone"
        ctx.log(f"setting {setting} ({shown}): {len(questions)} questions x {sampling.n} answers")
        with local.activated(roles) as model:
            answers.append(
                sample_answers(
                    model,
                    local.tokenizer,
                    questions,
                    sampling.n,
                    sampling.max_new_tokens,
                    sampling.temperature,
                    sampling.seed,
                    sampling.batch_size,
                    ctx.progress(f"setting {setting}: sampling", "questions"),
                    first_index=number * sampling.n,
                )
            )
    labels = [replicate_label(ctx, roles) for roles in replicates]
    return SampledSetting({"adapters": replicates}, labels, answers)


def sample_provider(
    ctx: StageContext,
    kind: str,
    setting: str,
    value: Setting,
    questions: Sequence[Question],
    sampling: Sampling,
) -> SampledSetting:
    from harness.lab.llm import make_provider

    models, roles, providers, labels, answers = [], [], [], [], []
    for number, item in enumerate(replicates_of(value)):
        model = provider_model_id(ctx, item, kind)
        sampler = make_provider({**item["provider"], "model": model}, seed=sampling.seed, log=ctx.log)
        where = item["provider"].get("base_url") or "the provider's default endpoint"
        ctx.log(f"setting {setting} ({model} at {where}): {len(questions)} questions x {sampling.n} answers")
        mine = provider_answers(
            sampler,
            questions,
            sampling.n,
            sampling.max_new_tokens,
            sampling.temperature,
            ctx.progress(f"setting {setting}: sampling", "answers"),
            first_index=number * sampling.n,
        )
        failed = sum(a.error is not None for a in mine)
        if failed:  # the provider's own log line names the first failure
            ctx.log(f"  {failed} of {len(mine)} answers could not be sampled; kept, unjudged")
        models.append(model)
        roles.append(item.get("finetuned"))
        providers.append({"name": item["provider"]["name"], "base_url": item["provider"].get("base_url")})
        labels.append(replicate_label(ctx, item))
        answers.append(mine)
    record = {
        "models": models,
        "finetuned": roles,
        "providers": providers,
        "sampling": {
            "temperature": sampling.temperature,
            "max_tokens": sampling.max_new_tokens,
            "seed": f"per answer, from the stage seed {sampling.seed} and the sample index",
        },
    }
    return SampledSetting(record, labels, answers)


Scored = tuple[str, int, "float | bool | None"]  # (question id, sample index, value; None: not scored)


def unit_samples(replicated: bool, labels: Sequence[str], scored: Sequence[Sequence[Scored]]) -> SampleSet:
    """A setting's scored values with their units (see the module docstring): `labels[i]` names
    what replicate i ran, `scored[i]` its answers' values; unscored ones are left out."""
    values, units = [], []
    for number, (label, answers) in enumerate(zip(labels, scored, strict=True)):
        for question_id, sample_index, value in answers:
            if value is not None:
                values.append(float(value))
                units.append(f"r{number}:{label}" if replicated else f"{label}:{question_id}#{sample_index}")
    return SampleSet(tuple(values), tuple(units), "training run" if replicated else "answer")
