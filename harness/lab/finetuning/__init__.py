"""Fine-tuning through a provider's API, each provider through its official Python client:
`openai` (OpenAI, or any endpoint serving its files and fine-tuning routes) and `together`
(Together AI: the optional `together` package, `pip install 'harness[together]'`).

    check_provider(config)                       # at collection: the client and the key are there
    with open_client(config, log=print) as client:
        file_id, created = client.upload(path)
        job = client.create(JobRequest(file_id, "gpt-4o-mini-2024-07-18", False, {"n_epochs": 3},
                                       suffix="sdf", seed=0), created)
        job = client.retrieve(job.id)            # jobs.Job: one status vocabulary for both
        events = client.new_events(job.id, seen)

`config` is a finetune_api stage's `provider`: name, api_key_env, base_url, timeout,
max_tries. The key goes from the environment straight into the client (never bound to a
name of ours, so no traceback shows it) and is scrubbed from every message; each call is
retried as `calls.Calls` says. `data` checks, counts and prices the rows before upload.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from harness.lab.finetuning.calls import Calls, ProviderCallError
from harness.lab.finetuning.jobs import SUCCEEDED, Event, Job, JobRequest, JobsClient
from harness.lab.finetuning.openai_jobs import OpenAIJobs
from harness.lab.finetuning.together_jobs import TogetherJobs
from harness.lab.llm import ProviderConfigError, api_key_from_env, require_key, resolve_base_url

__all__ = [
    "SUCCEEDED",
    "Event",
    "Job",
    "JobRequest",
    "JobsClient",
    "ProviderCallError",
    "ProviderConfigError",
    "CLIENTS",
    "accepted_hyperparameters",
    "check_provider",
    "open_client",
]

# provider -> (its client's package, the client class in it, our wrapper of it)
CLIENTS: dict[str, tuple[str, str, type[JobsClient]]] = {
    "openai": ("openai", "OpenAI", OpenAIJobs),
    "together": ("together", "Together", TogetherJobs),
}


def accepted_hyperparameters(provider: str) -> tuple[str, ...]:
    """The hyperparameters the provider's fine-tuning API takes, under the spec's names."""
    return CLIENTS[provider][2].hyperparameters


INSTALL = {"together": "pip install 'harness[together]' (or: pip install together)"}


def check_provider(config: Mapping[str, Any], needs_key: bool = True, at: tuple[str | int, ...] = ()) -> None:
    """Fail fast, without network, when `config` cannot work: an unknown provider, its
    client's package not installed, or (when `needs_key`) its key missing."""
    name = config.get("name")
    if name not in CLIENTS:
        raise ProviderConfigError(
            f"unknown fine-tuning provider {name!r}: expected one of {', '.join(CLIENTS)}"
        )
    package = CLIENTS[name][0]
    if importlib.util.find_spec(package) is None:
        raise ProviderConfigError(
            f"provider {name} needs the `{package}` package, which is not installed: {INSTALL[name]}"
        )
    if needs_key:
        require_key(str(config["api_key_env"]), name, at)


@contextmanager
def open_client(config: Mapping[str, Any], log: Callable[[str], None] = print) -> Iterator[JobsClient]:
    """The fine-tuning client `config` describes, closed on leaving."""
    check_provider(config, needs_key=False)
    package, class_name, jobs_class = CLIENTS[config["name"]]
    sdk = importlib.import_module(package)  # here, not at import: openai takes ~0.6 s, together more
    key_env = str(config["api_key_env"])
    client = _client(sdk, class_name, config, key_env)
    jobs = jobs_class(Calls(config["name"], sdk, client, key_env, int(config["max_tries"]), log))
    try:
        yield jobs
    finally:
        jobs.close()


def _client(sdk: Any, class_name: str, config: Mapping[str, Any], key_env: str) -> Any:
    """The SDK's client, the key passed from the environment straight into it, its own
    retries off (Calls retries)."""
    base_url = resolve_base_url(config.get("base_url"))  # first: a rehearsal's server sets its key
    try:
        return getattr(sdk, class_name)(
            api_key=api_key_from_env(key_env, config["name"]),
            base_url=base_url,  # None: the client's own default
            max_retries=0,
            timeout=float(config["timeout"]),
        )
    except ProviderConfigError:
        raise
    except Exception as error:  # e.g. a base_url the HTTP client cannot parse
        problem = f"{type(error).__name__}: {error}"
    # raised outside the except block: no chained traceback through the client's frames
    raise ProviderConfigError(
        f"provider {config['name']} cannot use base_url {config.get('base_url')!r}: {problem}"
    )
