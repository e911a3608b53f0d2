"""Capability benchmarks through EleutherAI's lm-evaluation-harness (lm-eval), used as a library.

A stage names its tasks `{<name>: {task, metrics}}`: `task` is a task YAML in the repo (its
path relative to the spec) or a task lm-eval registers (`gsm8k`), `metrics` the lm-eval
metric keys it reports (`acc`, or `exact_match,strict-match` for a filtered one). The names
and the metrics make the flattened metric names, `<name>.<metric>.<setting>`, known at
collection without reading a file.

A task YAML's `dataset_kwargs.data_files` are read relative to the YAML (lm-eval reads them
relative to the working directory), and its content, the files it includes, its data files
and the Python files beside it (`!function utils.process_results`) make `inputs_digest`, in the
stage's cache key. Nothing is downloaded: the datasets library runs offline.

Models: a local model (the base with its adapters, `harness.lab.settings.LocalModel`) is
wrapped in lm-eval's HFLM as it is, so toggling adapters changes what HFLM scores; a
provider model is lm-eval's `local-chat-completions` at the provider's base_url, the key
read from its `api_key_env` and sent as a header (never written anywhere). Chat APIs
return no prompt log-likelihoods: they run `generate_until` tasks only.

lm-eval is imported lazily: without the `evals` extra the stage kind still imports, and its
collection check says what to install (`missing_extra`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import statistics
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.core.stage import ParamError, StageError
from harness.lab.llm import resolve_base_url

INSTALL = "pip install -e '.[evals]'"
Z95 = 1.959963984540054
BASE = "base"  # the setting the deltas are taken against
DELTA = "delta"
CHAT_OUTPUT_TYPES = ("generate_until",)  # what a chat API can answer: no prompt log-likelihoods
TASK_FILE_SUFFIXES = (".yaml", ".yml")


def missing_extra() -> str | None:
    """Why lm-eval cannot be used here, with what to install; None when it can."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return (
            "capability_eval runs benchmarks through EleutherAI's lm-evaluation-harness, which is "
            f"not installed here; install the `evals` extra: {INSTALL}"
        )
    return None


# --- tasks and their metrics --------------------------------------------------------------------


def metric_key(metric: str) -> str:
    """lm-eval's results key of a metric as a spec writes it: `acc` -> `acc,none`."""
    return metric if "," in metric else f"{metric},none"


def flat_metric(metric: str) -> str:
    """A metric key as a gate can name it: `acc,none` -> `acc`, `exact_match,strict-match` ->
    `exact_match_strict_match`."""
    name, _, filtered = metric_key(metric).partition(",")
    return re.sub(r"\W", "_", name if filtered == "none" else f"{name}_{filtered}")


@dataclass(frozen=True)
class TaskEntry:
    """A task as the spec names it: `name` (in metric names), `task` (as written: a YAML path
    or an lm-eval task name) and the lm-eval metric keys it reports."""

    name: str
    task: str
    metrics: tuple[str, ...]

    @property
    def is_file(self) -> bool:
        return self.task.endswith(TASK_FILE_SUFFIXES)

    def path(self, spec_dir: Path) -> Path:
        return (spec_dir / self.task).resolve()


def task_entries(params: Mapping[str, Any]) -> list[TaskEntry]:
    """The tasks the stage runs; a task set to null is dropped (a profile drops a task it
    inherits: `mmlu: null`)."""
    tasks = params["tasks"].items()
    return [TaskEntry(name, t["task"], tuple(t["metrics"])) for name, t in tasks if t is not None]


def metric_names(tasks: Sequence[TaskEntry], settings: Sequence[str]) -> list[str]:
    """`<task>.<metric>.<setting>` for every setting, and `<task>.<metric>.delta.<setting>` for
    every setting but `base` when the settings have one."""
    names = []
    for entry in tasks:
        for metric in entry.metrics:
            prefix = f"{entry.name}.{flat_metric(metric)}"
            names += [f"{prefix}.{setting}" for setting in settings]
            if BASE in settings:
                names += [f"{prefix}.{DELTA}.{setting}" for setting in settings if setting != BASE]
    return names


def task_file_config(path: Path) -> dict[str, Any]:
    """A task YAML as lm-eval reads it (`include`s merged, `!function`s resolved), its data
    files made absolute: lm-eval would read them relative to the working directory."""
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(path, resolve_func=True)
    kwargs = dict(config.get("dataset_kwargs") or {})
    if "data_files" in kwargs:
        kwargs["data_files"] = _map_files(kwargs["data_files"], lambda f: str((path.parent / f).resolve()))
        config["dataset_kwargs"] = kwargs
    return config


def _raw_config(path: Path) -> dict[str, Any]:
    """A task YAML's merged config with its `!function`s as paths (nothing imported)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path, resolve_func=False)


def _map_files(files: Any, change: Callable[[str], str]) -> Any:
    if isinstance(files, str):
        return change(files)
    if isinstance(files, Mapping):
        return {split: _map_files(value, change) for split, value in files.items()}
    return [change(f) for f in files]


def _data_files(path: Path, config: Mapping[str, Any]) -> list[Path]:
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    names = (
        [files]
        if isinstance(files, str)
        else _flat(files.values() if isinstance(files, Mapping) else files or [])
    )
    return [(path.parent / name).resolve() for name in names]


def _flat(values: Iterable[Any]) -> list[str]:
    return [name for value in values for name in ([value] if isinstance(value, str) else value)]


def _config_metrics(config: Mapping[str, Any]) -> set[str]:
    metrics = [m["metric"] for m in config.get("metric_list") or [] if isinstance(m.get("metric"), str)]
    filters = [f["name"] for f in config.get("filter_list") or []] or ["none"]
    return {f"{metric},{name}" for metric in metrics for name in filters}


def registered_task(name: str) -> Mapping[str, Any] | None:
    """The config of a task lm-eval registers under `name` (None: no such task, or a group)."""
    from lm_eval.tasks import TaskManager

    entry = TaskManager().task_index.get(name)
    return entry.cfg if entry is not None and entry.yaml_path is not None and entry.cfg else None


def check_tasks(params: Mapping[str, Any], spec_dir: Path, chat_only: bool) -> None:
    """Each task file exists, reads, reports the metrics the spec names and, where a setting
    is a provider model (`chat_only`), is a generate_until task."""
    if not task_entries(params):
        raise ParamError(("tasks",), "every task is null: name at least one task to run")
    for entry in task_entries(params):
        at = ("tasks", entry.name)
        if entry.is_file:
            path = entry.path(spec_dir)
            if not path.is_file():
                raise ParamError((*at, "task"), f"task file not found: {entry.task} (looked for {path})")
            try:
                config = _raw_config(path)
            except Exception as error:  # lm-eval's loader: YAML syntax, a missing include
                raise ParamError((*at, "task"), f"{entry.task}: not a readable task YAML: {error}") from None
            missing = [f for f in _data_files(path, config) if not f.is_file()]
            if missing:
                raise ParamError((*at, "task"), f"{entry.task}: data file not found: {missing[0]}")
            known = _config_metrics(config)
            unknown = [m for m in entry.metrics if metric_key(m) not in known]
            if unknown:
                shown = ", ".join(sorted(k.removesuffix(",none") for k in known)) or "none"
                raise ParamError(
                    (*at, "metrics"),
                    f"{entry.task} reports no metric {unknown[0]!r} (its metric_list and filter_list "
                    f"give: {shown})",
                )
        else:
            config = registered_task(entry.task) if chat_only else {}
            if config is None:
                raise ParamError(
                    (*at, "task"),
                    f"{entry.task!r} is not a task lm-eval registers (or is a group, whose output types "
                    "cannot be checked for a provider setting); name a task YAML or a single task",
                )
        output_type = config.get("output_type", "generate_until" if config else None)
        if chat_only and output_type not in CHAT_OUTPUT_TYPES:
            raise ParamError(
                (*at, "task"),
                f"task {entry.name} is a {output_type} task: it scores the log-likelihood of the prompt's "
                "continuations, which a chat completions API does not return; a provider setting runs "
                "generate_until tasks only (move the task to a stage of local settings)",
            )


def inputs_digest(params: Mapping[str, Any], spec_dir: Path) -> str:
    """A digest of every task file's inputs: the YAML, its includes, its data files and the
    Python files beside it (the `!function`s); lm-eval's own tasks are the library's."""
    digest = hashlib.sha256()
    for entry in task_entries(params):
        if not entry.is_file:
            continue
        path = entry.path(spec_dir)
        config = _raw_config(path)
        files = sorted({*_data_files(path, config), *path.parent.glob("*.py")})
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        for file in files:
            digest.update(os.path.relpath(file, path.parent).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


# --- models -----------------------------------------------------------------------------------


@contextmanager
def offline() -> Iterator[None]:
    """The datasets library and the hub offline: data come from local files only. Both read
    their environment once, at import, so their settings are switched too."""
    import datasets.config
    import huggingface_hub.constants

    switches = [
        (datasets.config, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_DATASETS_OFFLINE"),
        (huggingface_hub.constants, "HF_HUB_OFFLINE"),
    ]
    names = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    environment = {name: os.environ.get(name) for name in names}
    before = [getattr(module, name) for module, name in switches]
    os.environ.update(dict.fromkeys(names, "1"))
    for module, name in switches:
        setattr(module, name, True)
    try:
        yield
    finally:
        for (module, name), value in zip(switches, before, strict=True):
            setattr(module, name, value)
        for name, value in environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def local_lm(model: Any, tokenizer: Any, batch_size: int) -> Any:
    """lm-eval's HFLM around a loaded model (adapters toggled outside change what it scores)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def provider_lm(provider: Mapping[str, Any], model: str, seed: int, max_gen_toks: int) -> Any:
    """lm-eval's local-chat-completions on an OpenAI-compatible endpoint; the key travels in the
    request header only."""
    from lm_eval.models.openai_completions import LocalChatCompletion

    base_url = (resolve_base_url(provider.get("base_url")) or "https://api.openai.com/v1").rstrip("/")
    return LocalChatCompletion(
        model=model,
        base_url=f"{base_url}/chat/completions",
        tokenizer_backend=None,
        tokenized_requests=False,
        num_concurrent=provider.get("concurrency", 4),
        max_retries=provider.get("max_tries", 3),
        timeout=int(provider.get("timeout", 300)),
        seed=seed,
        max_gen_toks=max_gen_toks,
        header={"Authorization": f"Bearer {os.environ[provider['api_key_env']]}"},
    )


# --- running ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """What the stage asks of lm-eval, whatever the model."""

    tasks: list[TaskEntry]
    spec_dir: Path
    limit: int | None
    num_fewshot: int | None
    max_gen_toks: int | None
    apply_chat_template: bool
    seed: int

    def task_specs(self) -> list[str | dict[str, Any]]:
        return [task_file_config(e.path(self.spec_dir)) if e.is_file else e.task for e in self.tasks]

    def evaluate(self, lm: Any, chat: bool) -> dict[str, Any]:
        """lm-eval's results of every task on `lm`, with per-sample logs; `chat`: a chat API
        (messages, generate_until only)."""
        import lm_eval
        from lm_eval.tasks import TaskManager

        specs = self.task_specs()
        registered = any(isinstance(spec, str) for spec in specs)  # indexing lm-eval's tasks takes seconds
        manager = TaskManager(include_defaults=registered)
        with offline():
            if chat:
                refuse_loglikelihood(manager.load(specs)["tasks"].values())
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=specs,
                task_manager=manager,
                num_fewshot=self.num_fewshot,
                limit=self.limit,
                log_samples=True,
                bootstrap_iters=1000,
                apply_chat_template=chat or self.apply_chat_template,
                gen_kwargs={"max_gen_toks": self.max_gen_toks} if self.max_gen_toks else None,
                random_seed=self.seed,
                numpy_random_seed=self.seed,
                torch_random_seed=self.seed,
                fewshot_random_seed=self.seed,
            )
        if results is None:
            raise StageError("lm-eval returned no results (a distributed run's non-main process?)")
        return results


def refuse_loglikelihood(tasks: Iterable[Any]) -> None:
    """A chat API gives no prompt log-likelihoods: a task (of a group) that needs them stops
    the stage before any request."""
    for task in tasks:
        if task.OUTPUT_TYPE not in CHAT_OUTPUT_TYPES:
            raise StageError(
                f"task {task.config.task} is a {task.OUTPUT_TYPE} task, which a chat completions API "
                "cannot score (no prompt log-likelihoods); a provider setting runs generate_until tasks only"
            )


# --- results -----------------------------------------------------------------------------------


def lm_task_name(entry: TaskEntry, spec_dir: Path) -> str:
    """The name lm-eval reports `entry` under: its YAML's `task:`, or the registered name."""
    return str(_raw_config(entry.path(spec_dir))["task"]) if entry.is_file else entry.task


def interval(value: float, stderr: Any) -> dict[str, float]:
    """A metric with lm-eval's standard error as a normal 95% interval (a bare value when
    lm-eval gives none: one sample, or a metric without one)."""
    se = stderr if isinstance(stderr, int | float) and math.isfinite(stderr) else 0.0
    return {"value": value, "ci_low": value - Z95 * se, "ci_high": value + Z95 * se}


@dataclass(frozen=True)
class Scores:
    """One task's metric in one setting: its value and standard error (pooled over replicates:
    the mean of the replicates' values, the standard error of that mean given each run), and
    the per-item scores (mean over replicates) by doc id."""

    value: float
    stderr: float | None
    per_item: dict[int, float] | None  # None: the metric is not a mean of per-item scores

    @classmethod
    def pooled(cls, replicates: Sequence[tuple[float, Any, dict[int, Any]]]) -> Scores:
        values = [value for value, _, _ in replicates]
        errors = [se for _, se, _ in replicates]
        stderr = (
            math.sqrt(sum(se**2 for se in errors)) / len(errors)
            if all(isinstance(se, int | float) and math.isfinite(se) for se in errors)
            else None
        )
        items = [_mean_items(value, per_item) for value, _, per_item in replicates]
        per_item = None
        if all(i is not None for i in items) and len({frozenset(i) for i in items}) == 1:
            per_item = {doc: statistics.fmean(i[doc] for i in items) for doc in items[0]}
        return cls(statistics.fmean(values), stderr, per_item)

    def interval(self) -> dict[str, float]:
        return interval(self.value, self.stderr)


def _mean_items(value: float, per_item: Mapping[int, Any]) -> dict[int, float] | None:
    """The per-item scores when the metric is their mean (acc, exact_match); else None."""
    if not per_item or not all(isinstance(v, int | float) for v in per_item.values()):
        return None
    scores = {doc: float(v) for doc, v in per_item.items()}
    return scores if math.isclose(statistics.fmean(scores.values()), value, abs_tol=1e-9) else None


def delta(setting: Scores, base: Scores) -> dict[str, Any]:
    """setting - base with a 95% CI: paired over the same items when both are means of per-item
    scores (the standard error of the per-item differences), else from the two standard errors."""
    if (
        setting.per_item is not None
        and base.per_item is not None
        and setting.per_item.keys() == base.per_item.keys()
    ):
        diffs = [setting.per_item[doc] - base.per_item[doc] for doc in base.per_item]
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
        return {**interval(statistics.fmean(diffs), se), "method": "paired", "n": len(diffs)}
    errors = (setting.stderr, base.stderr)
    se = math.sqrt(sum(e**2 for e in errors)) if all(e is not None for e in errors) else None
    return {**interval(setting.value - base.value, se), "method": "independent"}


def metric_of(results: Mapping[str, Any], task: str, metric: str) -> tuple[float, Any, dict[int, Any]]:
    """A metric's value, standard error and per-item scores in one lm-eval run."""
    key = metric_key(metric)
    name, _, filtered = key.partition(",")
    reported = results["results"].get(task, {})
    if key not in reported:
        shown = ", ".join(k for k in reported if "," in k and "_stderr" not in k)
        raise StageError(f"lm-eval reported no {key!r} for task {task} (it reported: {shown or 'nothing'})")
    per_item = {s["doc_id"]: s.get(name) for s in results["samples"].get(task, []) if s["filter"] == filtered}
    return reported[key], reported.get(f"{name}_stderr,{filtered}"), per_item


def prediction_rows(
    results: Mapping[str, Any], task: str, metrics: Sequence[str]
) -> Iterator[dict[str, Any]]:
    """One row per item and filter: the prompt, the target, lm-eval's filtered responses and the
    item's scores."""
    names = dict.fromkeys(metric_key(m).partition(",")[0] for m in metrics)  # in the order the spec gives
    for sample in sorted(results["samples"].get(task, []), key=lambda s: (s["doc_id"], s["filter"])):
        arguments = sample["arguments"]  # per request: (context, choice) or (context, gen_kwargs)
        yield {
            "doc_id": sample["doc_id"],
            "filter": sample["filter"],
            "prompt": _prompt(arguments[0][0]),
            "arguments": _jsonable([list(a[1:]) for a in arguments]),  # the choices, or the generation's
            "target": _jsonable(sample["target"]),
            "responses": _jsonable(sample["filtered_resps"]),
            "scores": {name: _jsonable(sample.get(name)) for name in names},
        }


def _prompt(context: Any) -> Any:
    """The prompt text, or for a chat model the messages: lm-eval's JsonChatStr, a 1-tuple of
    their JSON (a list once lm-eval has logged the sample)."""
    if isinstance(context, list | tuple) and len(context) == 1 and isinstance(context[0], str):
        return json.loads(context[0])
    return context


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# what lm-eval's results say of the measurement; the rest (date, git hash, the machine, the model's
# path on it) says where and when it ran
MEASUREMENT_KEYS = (
    "results",
    "groups",
    "group_subtasks",
    "configs",
    "versions",
    "n-shot",
    "higher_is_better",
    "n-samples",
)


def raw_results(results: Mapping[str, Any], spec_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """lm-eval's results without the per-sample logs (in predictions.jsonl) nor the configs'
    resolved functions, as (the measurement, where and when it ran): the measurement's data
    files named relative to the spec, so that its bytes do not depend on where the project
    lies."""
    from harness.core.store import relative_path

    measured = {key: results[key] for key in MEASUREMENT_KEYS if key in results}
    measured["configs"] = {
        name: _relative_files(config, lambda f: relative_path(f, spec_dir))
        for name, config in (results.get("configs") or {}).items()
    }
    environment = {key: value for key, value in results.items() if key not in (*MEASUREMENT_KEYS, "samples")}
    return _jsonable(measured), _jsonable(environment)


def _relative_files(config: Mapping[str, Any], change: Callable[[str], str]) -> dict[str, Any]:
    kwargs = config.get("dataset_kwargs") or {}
    if "data_files" not in kwargs:
        return dict(config)
    return {**config, "dataset_kwargs": {**kwargs, "data_files": _map_files(kwargs["data_files"], change)}}
