"""Text generation and judging providers: build one from a spec's `provider` mapping.

    provider = make_provider({"name": "openai", "model": "openai/gpt-4o-mini",
                              "base_url": "https://openrouter.ai/api/v1",
                              "api_key_env": "OPENROUTER_API_KEY"})
    answers = provider.complete_many([ChatRequest(messages=({"role": "user", "content": "hi"},))])

`check_provider` is the fast pre-flight check (no network) a collector runs so that a
missing key fails at once with one clear message, not after an hour of fine-tuning.
The key is only ever passed on, never bound to a name in a frame that raises, so no
traceback can show it.
`openai` is imported only when an `openai` provider is built: it takes ~0.6 s.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.core.paths import cache_dir
from harness.core.preflight import lacking
from harness.core.stage import StageError
from harness.lab.llm.base import ChatRequest, ChatResponse, Progress, Provider, ProviderError, Usage
from harness.lab.llm.cache import ResponseCache, request_key
from harness.lab.llm.offline import OfflineProvider
from harness.spec.validate import SPECS_DIR, with_defaults

if TYPE_CHECKING:
    from harness.lab.llm.openai_provider import OpenAIProvider

__all__ = [
    "TRANSPORT_KEYS",
    "transport_of",
    "ChatRequest",
    "ChatResponse",
    "OfflineProvider",
    "OpenAIProvider",
    "Progress",
    "Provider",
    "ProviderConfigError",
    "ProviderError",
    "ResponseCache",
    "Usage",
    "api_key_from_env",
    "check_provider",
    "default_cache_path",
    "make_provider",
    "request_key",
    "require_key",
    "resolve_base_url",
]

# Config keys that change how requests travel, never what comes back: a stage's cache
# key and the response cache's key leave them out. `base_url` is not among them: another
# endpoint may serve a differently quantized or versioned model under the same name.
TRANSPORT_KEYS = ("concurrency", "timeout", "max_tries")


def transport_of(*providers: str) -> tuple[str, ...]:
    """The transport params of the provider params at `providers` (`judge`,
    `settings.*.provider`): a stage kind leaves them out of its cache key."""
    return tuple(f"{where}.{key}" for where in providers for key in TRANSPORT_KEYS)


PROVIDER_SCHEMA = SPECS_DIR / "provider.schema.json"  # where the transport defaults are written


class ProviderConfigError(StageError):
    """The provider cannot be used as configured (unknown name, missing API key): a
    failure the user fixes, shown as its message alone."""


def api_key_from_env(env_name: str, provider: str = "openai") -> str:
    """The key held by `env_name`, or one clear error that names the variable (never a value)."""
    problem = _key_problem(os.environ.get(env_name))
    if problem:  # this frame holds no key: a traceback through it shows none
        raise ProviderConfigError(
            f"provider {provider} needs an API key: the environment variable {env_name} "
            f"(named by provider.api_key_env) {problem}. Export it, or run the same pipeline "
            "offline with `--profile tiny`."
        )
    return os.environ[env_name].strip()


def _key_problem(value: str | None) -> str | None:
    """What is wrong with a key, in words that never quote it; None if nothing is."""
    if value is None:
        return "is not set"
    if not value.strip():
        return "is empty"
    if not value.strip().isascii() or not all(c.isprintable() and not c.isspace() for c in value.strip()):
        return "holds characters an HTTP header cannot carry (spaces, control or non-ASCII characters)"
    return None


def check_provider(config: Mapping[str, Any], at: tuple[str | int, ...] = ()) -> None:
    """Fail fast, without network, when `config` (at `at` in a stage's params) cannot work."""
    if _check_shape(config) == "openai":
        require_key(str(config["api_key_env"]), "openai", at)


def require_key(env_name: str, provider: str, at: tuple[str | int, ...] = ()) -> None:
    """At collection: the key is usable; a missing one is recorded with every other lack of
    this machine while they are gathered (harness.core.preflight), else raises."""
    problem = _key_problem(os.environ.get(env_name))
    need = f"the environment variable {env_name} {problem}: provider {provider}'s API key"
    need += f" (`export {env_name}=...`)"
    if problem and not lacking(need, (*at, "api_key_env")):
        api_key_from_env(env_name, provider)


def _check_shape(config: Mapping[str, Any]) -> str:
    name = config.get("name")
    if name not in ("offline", "openai"):
        raise ProviderConfigError(f"unknown provider {name!r}: expected 'offline' or 'openai'")
    if name == "openai":
        for required in ("model", "api_key_env"):
            if not config.get(required):
                raise ProviderConfigError(f"provider openai needs `{required}`")
    return str(name)


REHEARSAL_SCHEME = "rehearsal://"  # a rehearsal's stand-in endpoint: harness.fixtures.rehearsal_llm


def resolve_base_url(base_url: str | None) -> str | None:
    """The URL a client connects to for a provider's `base_url`: a `rehearsal://` one is the
    scripted server this process starts (once) for a rehearsal; others are used as written.
    Only clients see the resolved URL: cache keys keep `rehearsal://...`, whatever the port."""
    if base_url is None or not base_url.startswith(REHEARSAL_SCHEME):
        return base_url
    from harness.fixtures.rehearsal_llm import endpoint

    return endpoint()


def default_cache_path() -> Path:
    return cache_dir() / "llm-responses.sqlite"


def make_provider(
    config: Mapping[str, Any],
    *,
    seed: int | None = None,
    cache_path: Path | None = None,
    log: Callable[[str], None] = print,
) -> Provider:
    """The provider a spec's `provider` mapping describes (see specs/provider.schema.json).
    `seed` (the stage's) goes with every sampled request and into its cache key, so a new
    seed draws new samples (`OpenAIProvider.request_seed`); the offline templates ignore it.

    The API key is read only when a request misses the cache, so a rerun whose answers
    are all cached works without it; call `check_provider` to insist on it up front.
    """
    if _check_shape(config) == "offline":
        return OfflineProvider(model=config.get("model", "templates"))
    from harness.lab.llm.openai_provider import OpenAIProvider

    config = with_defaults(dict(config), PROVIDER_SCHEMA)
    return OpenAIProvider(
        model=str(config["model"]),
        api_key_env=str(config["api_key_env"]),
        base_url=config.get("base_url"),
        concurrency=int(config["concurrency"]),
        timeout=float(config["timeout"]),
        max_tries=int(config["max_tries"]),
        cache=ResponseCache(cache_path or default_cache_path()),
        seed=seed,
        log=log,
    )


def __getattr__(name: str) -> Any:
    # `from harness.lab.llm import OpenAIProvider` works without importing openai eagerly
    if name == "OpenAIProvider":
        from harness.lab.llm.openai_provider import OpenAIProvider

        return OpenAIProvider
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
