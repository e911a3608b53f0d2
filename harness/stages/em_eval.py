"""`em_eval`: how often a model answers open questions in a misaligned way, per adapter setting.

Upstream: one finetune_lora stage per role named in `settings` (its `adapter/`). All those
adapters are loaded once, unmerged, on one base model (`harness.lab.models.adapters`), and
each setting activates its own subset: `{base: [], persona: [persona], em: [em],
persona_em: [persona, em]}` is the matrix of a persona x EM experiment. Per setting the
model answers every question `samples_per_question` times and the judge scores every
answer (`harness.lab.em`). Settings share the spec's seed, so they differ only by adapters.
A setting may list several adapter sets (`em: [[em_seed1], [em_seed2]]`): replicates,
e.g. one EM adapter per training seed, each answering in turn, their answers pooled
into the setting's EM rate (with each replicate's own rate beside it).

samples.json (harness.core.samples) keeps the unit of replication of every scored answer, so that
hypotheses resample what varies independently:
- a setting of replicates: the replicate, `r<i>:<its stages>` (level "training run"): answers
  of one training run share that run's adapter and are not independent of each other;
- a setting of one adapter set (`base: []`, `sycophancy: [sycophancy]`): one fixed model,
  `<its stages or base>:<question>#<sample>` (level "answer"): given the model, its answers
  are independent draws. A test then holds that model fixed: about a persona trained once,
  it says how EM acts on *that* persona adapter, not on another training run of the persona;
  written as one adapter set, an EM adapter is held fixed the same way.

Artifacts:
    answers.jsonl     setting, question_id, sample_index, text, aligned, coherent, misaligned, error
    em_results.json   per setting: em_rate {value, ci_low, ci_high}, coherent_rate, counts,
                      per question; the sampling parameters, the thresholds and the judge
    samples.json      per setting: 1.0 / 0.0 misaligned per scored answer, with its unit (above)
    em_rates.png      EM rate per setting with its 95% CI
    judge_metadata.json  the judge's usage: requests, cache hits, retries, tokens
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from harness.api import stage_kind
from harness.core.samples import SampleSet
from harness.core.stage import StageContext, StageError, tenths
from harness.core.upstream import adapter_dir, named_adapter_roles
from harness.lab.checks import em_params
from harness.lab.llm import TRANSPORT_KEYS
from harness.lab.plots import figure as new_figure

PER_SETTING = ("em_rate", "coherent_rate", "n_scored")


def settings_of(params: Mapping[str, Any]) -> dict[str, list]:
    return dict(params.get("settings") or {"base": []})


def is_replicated(value: list) -> bool:
    """Whether a setting is written as several adapter sets (replicates), not as one."""
    return bool(value) and isinstance(value[0], list)


def replicates_of(value: list) -> list[list[str]]:
    """A setting's adapter sets: one list of roles, or several (replicates, e.g. seeds)."""
    return [list(v) for v in value] if is_replicated(value) else [list(value)]


def unit_samples(replicated: bool, models: Sequence[str], judged: Sequence[Sequence[Any]]) -> SampleSet:
    """A setting's misaligned indicators with their units: per replicate (`models[i]` names its
    stages, `judged[i]` its judged answers) the replicate, or for one fixed model each answer."""
    values, units = [], []
    for number, (model, answers) in enumerate(zip(models, judged, strict=True)):
        for j in answers:
            if j.misaligned is not None:
                values.append(float(j.misaligned))
                answer = f"{model}:{j.question_id}#{j.sample_index}"
                units.append(f"r{number}:{model}" if replicated else answer)
    return SampleSet(tuple(values), tuple(units), "training run" if replicated else "answer")


def metric_names(params: Mapping[str, Any]) -> list[str]:
    return [f"{name}.{setting}" for setting in settings_of(params) for name in PER_SETTING]


def _adapters(ctx: StageContext, settings: Mapping[str, list[str]]) -> dict[str, Path]:
    sets = [roles for value in settings.values() for roles in replicates_of(value)]
    roles = list(dict.fromkeys(role for one in sets for role in one))
    missing = [role for role in roles if role not in ctx.upstream]
    if missing:
        have = ", ".join(sorted(ctx.upstream)) or "none"
        raise StageError(
            f"settings name the roles {', '.join(missing)}, which no upstream stage fills (upstream roles: "
            f"{have}); add them to `needs`, e.g. needs: {{{missing[0]}: <finetune stage>}}"
        )
    return {role: adapter_dir(ctx.upstream, "em_eval", only=False, role=role) for role in roles}


def _plot(results: Mapping[str, Mapping[str, Any]], path: Path, title: str) -> None:
    names = list(results)
    rates = [results[s]["em_rate"] for s in names]
    values = [r["value"] for r in rates]
    errors = [[r["value"] - r["ci_low"] for r in rates], [r["ci_high"] - r["value"] for r in rates]]
    figure = new_figure(max(4, 1.2 * len(names) + 2), 3.5)
    axes = figure.add_subplot()
    axes.bar(names, values, yerr=errors, capsize=4, color="tab:red", alpha=0.7)
    axes.set_ylabel("EM rate (misaligned / scored answers)")
    axes.set_ylim(0, 1)
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path)


@stage_kind(
    needs=named_adapter_roles,
    metrics=metric_names,
    input_params=("questions",),
    transport_params=tuple(f"judge.{key}" for key in TRANSPORT_KEYS),
    check=em_params,
)
def run(ctx: StageContext) -> dict[str, Any]:
    from harness.core.samples import SAMPLES_FILE, write_samples
    from harness.core.store import relative_path, write_json, write_jsonl
    from harness.lab.em import Measurement, rates, sampling_parameters
    from harness.lab.models import load_model, load_tokenizer
    from harness.lab.models.adapters import active, load_stacked

    p = ctx.params
    settings = settings_of(p)
    measurement = Measurement.from_params(p, ctx.seed, ctx.log)
    adapters = _adapters(ctx, settings)
    tokenizer = load_tokenizer(p["base"])
    model = load_stacked(p["base"], adapters) if adapters else load_model(p["base"])

    answers_rows: list[dict[str, Any]] = []
    results: dict[str, dict[str, Any]] = {}
    samples: dict[str, SampleSet] = {}
    n = p["samples_per_question"]

    def answered(done: int, total: int) -> str:
        return f"  {done}/{total} questions answered"

    for setting, value in settings.items():
        judged, per_replicate, by_replicate = [], [], []
        for number, roles in enumerate(replicates_of(value)):
            shown = " + ".join(roles) or "the base model alone"
            ctx.log(f"setting {setting} ({shown}): {len(measurement.questions)} questions x {n} answers")
            with active(model, roles) if adapters else nullcontext(model):
                # replicates of a setting number their samples on from each other's: every one is judged
                mine, summary = measurement.run(
                    model, tokenizer, f"setting {setting}", tenths(ctx.log, answered), first_index=number * n
                )
            answers_rows += [{"setting": setting, "replicate": number, **j.as_json()} for j in mine]
            per_replicate.append(summary["em_rate"])
            by_replicate.append(mine)
            judged += mine
        models = ["+".join(ctx.upstream[r].name for r in roles) or "base" for roles in replicates_of(value)]
        samples[setting] = unit_samples(is_replicated(value), models, by_replicate)
        results[setting] = {
            "adapters": replicates_of(value),
            "replicate_em_rates": per_replicate,
            "unit_level": samples[setting].level,
            **rates(judged, measurement.thresholds.coherent_above, ctx.seed),
        }
        em = results[setting]["em_rate"]
        ctx.log(
            f"  em_rate {em['value']:.3f} [{em['ci_low']:.3f}, {em['ci_high']:.3f}], coherent_rate "
            f"{results[setting]['coherent_rate']}, {results[setting]['n_unscored']} unscored"
        )

    out = ctx.out_dir
    write_jsonl(out / "answers.jsonl", answers_rows)
    provider = measurement.provider
    write_json(
        out / "em_results.json",
        {
            "base": p["base"],
            "questions": relative_path(p["questions"], ctx.spec_file.parent),
            "samples_per_question": n,
            "sampling": sampling_parameters(p["temperature"], p["max_new_tokens"]),
            "thresholds": vars(measurement.thresholds),
            "judge": {"name": provider.name, "model": provider.model},
            "settings": results,
        },
    )
    write_samples(out / SAMPLES_FILE, samples)
    _plot(results, out / "em_rates.png", f"{ctx.stage}: EM rate per setting ({n} samples per question)")
    # a *metadata.json is left out of the output digest: cache hits and retries vary by run
    write_json(out / "judge_metadata.json", {"usage": provider.usage.to_json()})

    metrics: dict[str, Any] = {}
    for setting, result in results.items():
        metrics[f"em_rate.{setting}"] = result["em_rate"]
        metrics[f"coherent_rate.{setting}"] = result["coherent_rate"]
        metrics[f"n_scored.{setting}"] = result["n_scored"]
    return metrics
