"""Settings: the models an evaluation stage measures, side by side, under one name each.

A setting is the model measured, from one of two sources:
- local adapters: a list of upstream roles (each a finetune_lora stage, its `adapter/`)
  active on the base model, `[]` for the base alone. All the adapters the settings name are
  loaded once, unmerged, on one base model (`LocalModel`), and each setting activates its own
  subset: `{base: [], persona: [persona], em: [em], persona_em: [persona, em]}`.
- a provider model: `{provider: <provider>, model: <id>}`, a model an OpenAI-compatible server
  serves, or `{provider: <provider>, finetuned: <role>}`, the model the finetune_api stage in
  that role made (its `finetuned_model.json`).
A setting may list several adapter sets (`em: [[em_seed1], [em_seed2]]`) or provider models:
replicates, one per training run. Every evaluation kind with `settings` (em_eval,
capability_eval, safety_eval, belief_eval) reads them through this module, so they mean the
same everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.core.stage import ParamError, Role, StageContext, StageError
from harness.core.upstream import adapter_dir, finetuned_model_id, finetuned_role, named_adapter_roles
from harness.lab.checks import provider_at

Setting = list | Mapping  # adapter roles, lists of them, a provider model or a list of them

# where a kind with settings declares its transport params (`<where>.<transport key>`)
SETTING_PROVIDERS = ("settings.*.provider", "settings.*.*.provider")


def settings_of(params: Mapping[str, Any]) -> dict[str, Setting]:
    return dict(params.get("settings") or {"base": []})


def is_provider_setting(value: Setting) -> bool:
    """Whether a setting samples provider models (a mapping, or a list of them), not adapters."""
    return isinstance(value, Mapping) or (bool(value) and isinstance(value[0], Mapping))


def is_replicated(value: Setting) -> bool:
    """Whether a setting is written as several adapter sets or provider models (replicates)."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], list | Mapping)


def replicates_of(value: Setting) -> list:
    """A setting's models: one, or several (replicates, e.g. one per training seed); each a list
    of adapter roles, or a `{provider, model | finetuned}` mapping."""
    items = value if is_replicated(value) else [value]
    return [item if isinstance(item, Mapping) else list(item) for item in items]


def provider_models(params: Mapping[str, Any]) -> list[tuple[tuple[str | int, ...], Mapping[str, Any]]]:
    """Every provider model the settings name, with its path in the params."""
    found: list[tuple[tuple[str | int, ...], Mapping[str, Any]]] = []
    for setting, value in settings_of(params).items():
        if isinstance(value, Mapping):
            found.append((("settings", setting), value))
        elif is_provider_setting(value):
            found += [(("settings", setting, index), item) for index, item in enumerate(value)]
    return found


def finetuned_roles(params: Mapping[str, Any]) -> list[Role]:
    """The roles that provider settings name by `finetuned`, each declared where first named."""
    roles: dict[str, Role] = {}
    for path, item in provider_models(params):
        if "finetuned" in item:
            roles.setdefault(item["finetuned"], finetuned_role(item["finetuned"], (*path, "finetuned")))
    return list(roles.values())


def setting_roles(params: Mapping[str, Any]) -> tuple[Role, ...]:
    """Every upstream role the settings name: adapters and fine-tuned provider models (a kind's
    `needs`)."""
    return (*named_adapter_roles(params), *finetuned_roles(params))


def check_settings(params: Mapping[str, Any]) -> None:
    """A local setting has a base model to load; each provider model is named once and its
    provider can work here (its key is set)."""
    settings = settings_of(params)
    local = [setting for setting, value in settings.items() if not is_provider_setting(value)]
    if local and "base" not in params:
        raise ParamError(
            ("settings", local[0]),
            f"setting {local[0]} activates adapters on a local model: it needs `base`, the model they "
            "were trained on (only settings of provider models run without one)",
        )
    for path, item in provider_models(params):
        named = [key for key in ("model", "finetuned") if key in item]
        if len(named) != 1:
            found = " and ".join(f"`{key}`" for key in named) or "neither"
            raise ParamError(
                path,
                "a provider setting names its model by `model: <id>` (a model the provider serves) "
                "or by `finetuned: <role>` (the model the finetune_api stage in that role of `needs` "
                f"made), one of the two; found {found}",
            )
        # the setting names the model: check_provider asks only that there is one
        provider_at({**item["provider"], "model": item[named[0]]}, (*path, "provider"))


def provider_model_id(ctx: StageContext, item: Mapping[str, Any], kind: str) -> str:
    """The model id a provider setting of a `kind` stage names: its `model`, or its fine-tuned
    role's model."""
    role = item.get("finetuned")
    return finetuned_model_id(ctx.upstream, role, kind) if role else item["model"]


def replicate_label(ctx: StageContext, item: list | Mapping[str, Any]) -> str:
    """What a replicate ran, for units and logs: its stages (`persona+em`, `base`), its
    fine-tuned role's stage, or its model id."""
    if isinstance(item, Mapping):
        role = item.get("finetuned")
        return ctx.upstream[role].name if role else item["model"]
    return "+".join(ctx.upstream[r].name for r in item) or "base"


@dataclass(frozen=True)
class LocalModel:
    """The base model with every adapter the local settings name loaded, unmerged."""

    model: Any
    tokenizer: Any
    has_adapters: bool

    @classmethod
    def load(cls, ctx: StageContext, settings: Mapping[str, Setting], kind: str) -> LocalModel:
        """The base model and the adapters of the local settings of a `kind` stage."""
        from harness.lab.models import load_model, load_tokenizer
        from harness.lab.models.adapters import load_stacked

        base = ctx.params["base"]
        adapters = _adapters(ctx, settings, kind)
        model = load_stacked(base, adapters) if adapters else load_model(base)
        return cls(model, load_tokenizer(base), bool(adapters))

    @contextmanager
    def activated(self, roles: list[str]) -> Iterator[Any]:
        """The model with exactly the adapters of `roles` active (none: the base alone)."""
        from harness.lab.models.adapters import active

        with active(self.model, roles) if self.has_adapters else nullcontext(self.model) as model:
            yield model


def _adapters(ctx: StageContext, settings: Mapping[str, Setting], kind: str) -> dict[str, Path]:
    local = [value for value in settings.values() if not is_provider_setting(value)]
    sets = [roles for value in local for roles in replicates_of(value)]
    roles = list(dict.fromkeys(role for one in sets for role in one))
    missing = [role for role in roles if role not in ctx.upstream]
    if missing:
        have = ", ".join(sorted(ctx.upstream)) or "none"
        raise StageError(
            f"settings name the roles {', '.join(missing)}, which no upstream stage fills (upstream roles: "
            f"{have}); add them to `needs`, e.g. needs: {{{missing[0]}: <finetune stage>}}"
        )
    return {role: adapter_dir(ctx.upstream, kind, only=False, role=role) for role in roles}
