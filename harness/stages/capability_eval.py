"""`capability_eval`: standard benchmarks through lm-evaluation-harness, per setting.

Did fine-tuning cost the model its general capabilities? Each setting (`harness.lab.settings`:
adapters on the local base model, or a provider model) runs the same lm-eval tasks, and each
task's metrics are compared with the setting `base` on the same items
(`harness.lab.capability`). Tasks are task YAMLs in the repo, reading local data files in each
public dataset's own format (`data/evals/tasks/`), or tasks lm-eval registers; nothing is
downloaded. lm-eval is the `evals` extra: without it, collection stops and says what to install.

Replicates (a setting of several adapter sets or provider models) each run every task; the
setting's value is the mean of theirs, its standard error that of the mean given each run
(the runs' sampling error, not the spread between training runs), its per-item scores the
replicates' means, and each replicate's values are kept in capability_results.json.

Metrics: `<task>.<metric>.<setting>` {value, ci_low, ci_high} (lm-eval's standard error as a
normal 95% interval) and `<task>.<metric>.delta.<setting>` (setting - base: paired over the
items when the metric is a mean of per-item scores, acc or exact_match).

Artifacts:
    capability_results.json  per task: its file or name, lm-eval's name, metrics, config, version,
                             n-shot and n-samples; per setting: where it came from (adapters,
                             or models and providers), per task and metric the value, CI, each
                             replicate's value and the delta against base; lm-eval's version
    predictions.jsonl        setting, replicate, task, doc_id, filter, prompt, arguments, target,
                             responses, scores: every item lm-eval scored
    lm_eval/<setting>.<replicate>.json  lm-eval's own results of each run, without the samples,
                             its data files relative to the spec; `.metadata.json` beside it:
                             the rest (date, git hash, machine, model path), outside the digest
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.api import stage_kind
from harness.core.stage import ParamError, StageContext
from harness.lab import capability
from harness.lab.llm import transport_of
from harness.lab.settings import (
    SETTING_PROVIDERS,
    LocalModel,
    check_settings,
    is_provider_setting,
    provider_model_id,
    replicate_label,
    replicates_of,
    setting_roles,
    settings_of,
)


def metric_names(params: Mapping[str, Any]) -> list[str]:
    return capability.metric_names(capability.task_entries(params), list(settings_of(params)))


def check(params: Mapping[str, Any], spec_dir: Path) -> None:
    missing = capability.missing_extra()
    if missing:
        raise ParamError(("tasks",), missing)
    if capability.DELTA in settings_of(params):
        raise ParamError(
            ("settings", capability.DELTA), "`delta` names the deltas against base; rename the setting"
        )
    check_settings(params)
    chat = any(is_provider_setting(value) for value in settings_of(params).values())
    capability.check_tasks(params, spec_dir, chat_only=chat)


def inputs_digest(params: Mapping[str, Any], spec_dir: Path) -> str:
    return f"tasks:{capability.inputs_digest(params, spec_dir)}"


@stage_kind(
    needs=setting_roles,
    metrics=metric_names,
    transport_params=(
        "batch_size",
        *transport_of(*SETTING_PROVIDERS),
    ),
    check=check,
    code_version=inputs_digest,
)
def run(ctx: StageContext) -> dict[str, Any]:
    p = ctx.params
    settings = settings_of(p)
    entries = capability.task_entries(p)
    spec_dir = ctx.spec_file.parent
    job = capability.Run(
        tasks=entries,
        spec_dir=spec_dir,
        limit=p.get("limit"),
        num_fewshot=p.get("num_fewshot"),
        max_gen_toks=p.get("max_gen_toks"),
        apply_chat_template=p["apply_chat_template"],
        seed=ctx.seed,
    )
    local_settings = {s: v for s, v in settings.items() if not is_provider_setting(v)}
    local = LocalModel.load(ctx, local_settings, "capability_eval") if local_settings else None
    hflm = capability.local_lm(local.model, local.tokenizer, p["batch_size"]) if local else None
    runs: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    sources: dict[str, dict[str, Any]] = {}
    for setting, value in settings.items():
        runs[setting] = []
        for number, item in enumerate(replicates_of(value)):
            label = replicate_label(ctx, item)
            ctx.log(f"setting {setting}, replicate {number} ({label}): {len(entries)} tasks")
            if setting in local_settings:
                with local.activated(item):
                    results = job.evaluate(hflm, chat=False)
            else:
                model = provider_model_id(ctx, item, "capability_eval")
                lm = capability.provider_lm(item["provider"], model, ctx.seed, p.get("max_gen_toks") or 256)
                results = job.evaluate(lm, chat=True)
            runs[setting].append((label, results))
        sources[setting] = _source(value)
    return write_results(ctx, entries, runs, sources)


def _source(value: Any) -> dict[str, Any]:
    if not is_provider_setting(value):
        return {"adapters": replicates_of(value)}
    items = replicates_of(value)
    return {
        "models": [item.get("model") for item in items],
        "finetuned": [item.get("finetuned") for item in items],
        "providers": [
            {"name": i["provider"]["name"], "base_url": i["provider"].get("base_url")} for i in items
        ],
    }


def write_results(
    ctx: StageContext,
    entries: list[capability.TaskEntry],
    runs: Mapping[str, list[tuple[str, dict[str, Any]]]],
    sources: Mapping[str, dict[str, Any]],
) -> dict[str, Any]:
    from harness.core.store import write_json, write_jsonl

    spec_dir = ctx.spec_file.parent
    names = {entry.name: capability.lm_task_name(entry, spec_dir) for entry in entries}
    metrics: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    scores: dict[tuple[str, str, str], capability.Scores] = {}
    per_setting: dict[str, dict[str, Any]] = {}
    for setting, replicates in runs.items():
        tasks: dict[str, Any] = {}
        for entry in entries:
            task = names[entry.name]
            for number, (_, results) in enumerate(replicates):
                for row in capability.prediction_rows(results, task, entry.metrics):
                    rows.append({"setting": setting, "replicate": number, "task": entry.name, **row})
            for metric in entry.metrics:
                measured = [capability.metric_of(results, task, metric) for _, results in replicates]
                pooled = scores[entry.name, metric, setting] = capability.Scores.pooled(measured)
                flat = f"{entry.name}.{capability.flat_metric(metric)}"
                metrics[f"{flat}.{setting}"] = pooled.interval()
                tasks.setdefault(entry.name, {})[capability.flat_metric(metric)] = {
                    **pooled.interval(),
                    "stderr": pooled.stderr,
                    "replicates": [
                        {"run": label, "value": v, "stderr": se}
                        for (label, _), (v, se, _) in zip(replicates, measured, strict=True)
                    ],
                }
                value, low, high = (metrics[f"{flat}.{setting}"][k] for k in ("value", "ci_low", "ci_high"))
                ctx.log(f"  {flat}.{setting}: {value:.3f} [{low:.3f}, {high:.3f}]")
        per_setting[setting] = {**sources[setting], "tasks": tasks}
    if capability.BASE in runs:
        for (task, metric, setting), pooled in scores.items():
            if setting == capability.BASE:
                continue
            change = capability.delta(pooled, scores[task, metric, capability.BASE])
            flat = f"{task}.{capability.flat_metric(metric)}"
            metrics[f"{flat}.{capability.DELTA}.{setting}"] = {
                k: change[k] for k in ("value", "ci_low", "ci_high")
            }
            per_setting[setting]["tasks"][task][capability.flat_metric(metric)]["delta"] = change
            ctx.log(f"  {flat}.delta.{setting}: {change['value']:+.3f} ({change['method']})")

    first = next(iter(runs.values()))[0][1]
    configs = capability.raw_results(first, spec_dir)[0]["configs"]  # once, not per task
    out = ctx.out_dir
    write_jsonl(out / "predictions.jsonl", rows)
    (out / "lm_eval").mkdir()
    for setting, replicates in runs.items():
        for number, (_, results) in enumerate(replicates):
            measured, environment = capability.raw_results(results, spec_dir)
            write_json(out / "lm_eval" / f"{setting}.{number}.json", measured)
            # a *metadata.json is left out of the output digest: lm-eval's date, git hash, machine
            write_json(out / "lm_eval" / f"{setting}.{number}.metadata.json", environment)
    write_json(
        out / "capability_results.json",
        {
            "lm_eval_version": first.get("lm_eval_version"),
            "limit": ctx.params.get("limit"),
            "tasks": {
                entry.name: {
                    "task": entry.task,
                    "lm_eval_task": names[entry.name],
                    "metrics": list(entry.metrics),
                    "version": first["versions"].get(names[entry.name]),
                    "n_shot": first["n-shot"].get(names[entry.name]),
                    "n_samples": first["n-samples"].get(names[entry.name]),
                    "config": configs.get(names[entry.name]),
                }
                for entry in entries
            },
            "settings": per_setting,
        },
    )
    return metrics
