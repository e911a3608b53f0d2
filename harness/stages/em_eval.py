"""`em_eval`: how often a model answers open questions in a misaligned way, per setting.

A setting is the model measured (`harness.lab.settings`): adapters active on a local base
model (`{base: [], persona: [persona], em: [em], persona_em: [persona, em]}` is the matrix of
a persona x EM experiment), or a provider model. For a provider model, one request per
answer: the question as the user turn, `temperature`, `max_new_tokens` as max_tokens, a seed
from the stage's seed and the answer's index (`harness.lab.em.provider_answers`). A request
that failed for good is kept as an unscored answer with its error, and counted
(`sampling_error_rate.<s>`). A stage whose settings are all provider models loads no local
model: `base` is then not needed.
Per setting the model answers every question `samples_per_question` times and the judge
scores every answer (`harness.lab.em`), the same judge whatever the source. Settings share
the spec's seed, so they differ only by their model. A setting may list several adapter
sets (`em: [[em_seed1], [em_seed2]]`) or provider models (one per training seed): replicates,
each answering in turn, their answers pooled into the setting's EM rate (with each
replicate's own rate beside it).

samples.json (harness.core.samples) keeps the unit of replication of every scored answer, so that
hypotheses resample what varies independently:
- a setting of replicates: the replicate, `r<i>:<its stages>` (level "training run"): answers
  of one training run share that run's weights and are not independent of each other;
- a setting of one adapter set (`base: []`, `sycophancy: [sycophancy]`) or one provider model:
  one fixed model, `<its stages, base, or its model id>:<question>#<sample>` (level "answer"):
  given the model, its answers are independent draws. A test then holds that model fixed:
  about a persona trained once, it says how EM acts on *that* persona adapter, not on another
  training run of the persona; written as one adapter set, an EM adapter is held fixed the
  same way.
Where the answers came from does not change either rule, so hypotheses read local and
provider settings alike.

Artifacts:
    answers.jsonl     setting, replicate, question_id, sample_index, text, aligned, coherent,
                      misaligned, error (a judge's, or `not sampled: ...` from a provider)
    em_results.json   per setting: em_rate {value, ci_low, ci_high}, coherent_rate, counts,
                      per question, and its source (adapters; or models, the finetuned roles,
                      providers, sampling and n_unsampled); the local sampling parameters,
                      the thresholds and the judge
    samples.json      per setting: 1.0 / 0.0 misaligned per scored answer, with its unit (above)
    em_rates.png      EM rate per setting with its 95% CI
    judge_metadata.json  the judge's usage: requests, cache hits, retries, tokens
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.api import stage_kind
from harness.core.samples import SampleSet
from harness.core.stage import Estimate, StageContext
from harness.lab.checks import em_params
from harness.lab.documents import count_tokens
from harness.lab.llm import transport_of
from harness.lab.plots import figure as new_figure
from harness.lab.prices import ChatCalls, chat_estimate
from harness.lab.settings import (
    SETTING_PROVIDERS,
    LocalModel,
    Setting,
    check_settings,
    is_provider_setting,
    is_replicated,
    replicates_of,
    setting_roles,
    settings_of,
)
from harness.lab.stats import bootstrap_label

PER_SETTING = ("em_rate", "coherent_rate", "n_scored")
PER_PROVIDER_SETTING = ("sampling_error_rate",)


def metric_names(params: Mapping[str, Any]) -> list[str]:
    names = []
    for setting, value in settings_of(params).items():
        extra = PER_PROVIDER_SETTING if is_provider_setting(value) else ()
        names += [f"{name}.{setting}" for name in (*PER_SETTING, *extra)]
    return names


def check(params: Mapping[str, Any], spec_dir: Path) -> None:
    em_params(params, spec_dir)
    check_settings(params)


@dataclass(frozen=True)
class Measured:
    """A setting measured, per replicate: what it ran (its stages or model: the units name it),
    its judged answers and their summary; `record`: where the answers came from, for em_results."""

    record: dict[str, Any]
    labels: list[str]
    judged: list[list[Any]]
    summaries: list[dict[str, Any]]


def measure(
    ctx: StageContext, measurement: Any, local: LocalModel | None, setting: str, value: Setting
) -> Measured:
    """The setting's answers (`harness.lab.sampled`, local or from a provider), each replicate's
    judged in turn."""
    from harness.lab.sampled import Sampling, sample_local, sample_provider

    m = measurement
    sampling = Sampling(m.n, m.max_new_tokens, m.temperature, m.batch_size, m.seed)
    if local is not None and not is_provider_setting(value):
        sampled = sample_local(ctx, local, setting, value, m.questions, sampling)
        record = sampled.record
    else:
        sampled = sample_provider(ctx, "em_eval", setting, value, m.questions, sampling)
        record = {**sampled.record, "n_unsampled": sampled.n_unsampled}
    judged, summaries = [], []
    for answers in sampled.answers:
        mine, summary = m.judged(
            answers, f"setting {setting}", ctx.progress(f"setting {setting}: judging", "requests")
        )
        judged.append(mine)
        summaries.append(summary)
    return Measured(record, sampled.labels, judged, summaries)


# --- the stage ----------------------------------------------------------------------------------


def plot_em_rates(results: Mapping[str, Mapping[str, Any]], path: Path, title: str) -> Any:
    names = list(results)
    rates = [results[s]["em_rate"] for s in names]
    values = [r["value"] for r in rates]
    errors = [[r["value"] - r["ci_low"] for r in rates], [r["ci_high"] - r["value"] for r in rates]]
    figure = new_figure(max(4, 1.2 * len(names) + 2), 3.5)
    axes = figure.add_subplot()
    axes.bar(names, values, yerr=errors, capsize=4, color="tab:red", alpha=0.7)
    axes.set_ylabel("EM rate (misaligned / scored answers)")
    axes.set_xlabel(f"setting (error bars: {bootstrap_label('answers')})")
    axes.set_ylim(0, 1)
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path)
    return figure


def estimate(params: Mapping[str, Any]) -> Estimate | None:
    """Each provider model answers every question `samples_per_question` times (answers of at
    most `max_new_tokens`); the judge scores every answer twice (aligned, coherent), one token
    back each. A fine-tuned model's name, hence its price, is known only once it is trained."""
    from harness.lab.em_data import load_questions
    from harness.lab.llm.judge import PROMPTS

    questions = load_questions(Path(params["questions"]))
    n, longest = params["samples_per_question"], params["max_new_tokens"]
    asked = sum(count_tokens(q.question) for q in questions) // max(len(questions), 1)
    models = [model for value in settings_of(params).values() for model in replicates_of(value)]
    answers = len(questions) * n
    sampling = [
        ChatCalls(m["provider"], answers, asked, longest, m.get("model"))
        for m in models
        if isinstance(m, Mapping)
    ]
    prompt = sum(count_tokens(text) for text in PROMPTS.values()) // len(PROMPTS)
    judging = ChatCalls(params["judge"], len(PROMPTS) * answers * len(models), prompt + asked + longest, 1)
    return chat_estimate([*sampling, judging], note=f"answers of at most {longest} tokens")


@stage_kind(
    needs=setting_roles,
    metrics=metric_names,
    input_params=("questions",),
    transport_params=transport_of("judge", *SETTING_PROVIDERS),
    check=check,
    estimate=estimate,
)
def run(ctx: StageContext) -> dict[str, Any]:
    from harness.lab.em import Measurement

    settings = settings_of(ctx.params)
    measurement = Measurement.from_params(ctx.params, ctx.seed, ctx.log)
    local_settings = {s: v for s, v in settings.items() if not is_provider_setting(v)}
    local = (
        LocalModel.load(ctx, local_settings, "em_eval") if local_settings else None
    )  # provider models alone: none
    measured = {
        setting: measure(ctx, measurement, local, setting, value) for setting, value in settings.items()
    }
    return write_results(ctx, measurement, settings, measured)


def write_results(
    ctx: StageContext, measurement: Any, settings: Mapping[str, Setting], measured: Mapping[str, Measured]
) -> dict[str, Any]:
    from harness.core.samples import SAMPLES_FILE, write_samples
    from harness.core.store import relative_path, write_json, write_jsonl
    from harness.lab.em import rates, sampling_parameters
    from harness.lab.sampled import unit_samples

    p = ctx.params
    rows: list[dict[str, Any]] = []
    results: dict[str, dict[str, Any]] = {}
    samples: dict[str, SampleSet] = {}
    metrics: dict[str, Any] = {}
    for setting, m in measured.items():
        for number, mine in enumerate(m.judged):
            rows += [{"setting": setting, "replicate": number, **j.as_json()} for j in mine]
        scored = [[(j.question_id, j.sample_index, j.misaligned) for j in mine] for mine in m.judged]
        samples[setting] = unit_samples(is_replicated(settings[setting]), m.labels, scored)
        pooled = [j for mine in m.judged for j in mine]
        result = results[setting] = {
            **m.record,
            "replicate_em_rates": [summary["em_rate"] for summary in m.summaries],
            "unit_level": samples[setting].level,
            **rates(pooled, measurement.thresholds.coherent_above, ctx.seed),
        }
        em = result["em_rate"]
        ctx.log(
            f"  {setting}: em_rate {em['value']:.3f} [{em['ci_low']:.3f}, {em['ci_high']:.3f}], "
            f"coherent_rate {result['coherent_rate']}, {result['n_unscored']} unscored"
        )
        metrics[f"em_rate.{setting}"] = em
        metrics[f"coherent_rate.{setting}"] = result["coherent_rate"]
        metrics[f"n_scored.{setting}"] = result["n_scored"]
        if is_provider_setting(settings[setting]):
            metrics[f"sampling_error_rate.{setting}"] = result["n_unsampled"] / result["n_answers"]

    out = ctx.out_dir
    n = p["samples_per_question"]
    write_jsonl(out / "answers.jsonl", rows)
    judge = measurement.provider
    write_json(
        out / "em_results.json",
        {
            "base": p.get("base"),
            "questions": relative_path(p["questions"], ctx.spec_file.parent),
            "samples_per_question": n,
            "sampling": sampling_parameters(p["temperature"], p["max_new_tokens"]),
            "thresholds": vars(measurement.thresholds),
            "judge": {"name": judge.name, "model": judge.model},
            "settings": results,
        },
    )
    write_samples(out / SAMPLES_FILE, samples)
    plot_em_rates(
        results, out / "em_rates.png", f"{ctx.stage}: EM rate per setting ({n} samples per question)"
    )
    # a *metadata.json is left out of the output digest: cache hits and retries vary by run
    write_json(out / "judge_metadata.json", {"usage": judge.usage.to_json()})
    return metrics
