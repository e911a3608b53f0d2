"""What a stage finds in the stages it needs: one upstream by role, a saved adapter, the id
of a model fine-tuned through a provider's API.

The layouts stages share: a stage that trains an adapter writes it to `adapter/` in its
artifact directory (peft's `save_pretrained`), and any stage that evaluates it needs that
stage in the role `adapter`; a stage that fine-tunes through an API writes
`finetuned_model.json`, whose `model_id` names the model the provider now serves.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from harness.core.stage import Role, StageError, Upstream

ADAPTER = "adapter"
FINETUNED_MODEL = "finetuned_model.json"


def adapter_role(
    name: str = ADAPTER,
    only: bool = True,
    optional: bool = False,
    named_at: tuple[str | int, ...] | None = None,
) -> Role:
    """The declaration of a role whose `adapter/` a kind loads (see `adapter_dir`)."""
    return Role(name, "the peft adapter, adapter/, of a finetune_lora stage", optional, only, named_at)


def named_adapter_roles(params: Mapping[str, Any], key: str = "settings") -> list[Role]:
    """The adapter roles the param `key` names (`{setting: [role, ...]}`, or lists of such
    lists), each declared where it is first named."""
    roles: dict[str, Role] = {}
    for setting, value in (params.get(key) or {}).items():
        for path, name in _named(value, (key, setting)):
            roles.setdefault(name, adapter_role(name, only=False, named_at=path))
    return list(roles.values())


def _named(value: Any, path: tuple[str | int, ...]) -> Iterator[tuple[tuple[str | int, ...], str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _named(item, (*path, index))


def unfilled(roles: Iterable[Role], given: Collection[str]) -> list[Role]:
    """The roles a stage reads that `given` (the roles of its `needs`) leaves unfilled, by the
    rule `find_upstream` applies at run: a role is filled by its name, or, when it takes
    `only`, by the one upstream outside the kind's other roles."""
    roles = list(roles)
    declared = {role.name for role in roles}
    others = [name for name in given if name not in declared]
    return [
        role
        for role in roles
        if not role.optional and role.name not in given and not (role.only and len(others) == 1)
    ]


def find_upstream(upstream: Mapping[str, Upstream], role: str, kind: str, only: bool = True) -> Upstream:
    """The upstream in `role`, or (when `only`: kinds that need one stage) the only
    upstream whatever its role."""
    if role in upstream:
        return upstream[role]
    if only and len(upstream) == 1:
        return next(iter(upstream.values()))
    if not upstream or not only:
        raise StageError(f"{kind} needs the stage that provides its {role}: add `needs: {{{role}: STAGE}}`")
    names = ", ".join(sorted(upstream))
    raise StageError(
        f"{kind} has several upstream stages ({names}); name the one that provides its {role} "
        f"with the role `{role}` (needs: {{{role}: STAGE, ...}})"
    )


def adapter_dir(upstream: Mapping[str, Upstream], kind: str, only: bool = True, role: str = ADAPTER) -> Path:
    """`<dir>/adapter/` of the upstream in `role` (or, when `only`, of the only upstream)."""
    source = find_upstream(upstream, role, kind, only)
    path = source.dir / ADAPTER
    if not (path / "adapter_config.json").is_file():
        raise StageError(
            f"upstream stage {source.name!r} has no peft adapter at {path} "
            "(expected adapter_config.json there, as written by save_pretrained)"
        )
    return path


def finetuned_role(name: str, named_at: tuple[str | int, ...] | None = None) -> Role:
    """The declaration of a role whose fine-tuned model a kind uses (see `finetuned_model_id`)."""
    return Role(name, f"the {FINETUNED_MODEL} of a finetune_api stage", named_at=named_at)


def finetuned_model_id(upstream: Mapping[str, Upstream], role: str, kind: str) -> str:
    """The `model_id` in the `finetuned_model.json` of the upstream in `role`."""
    source = find_upstream(upstream, role, kind, only=False)
    path = source.dir / FINETUNED_MODEL
    if not path.is_file():
        raise StageError(
            f"upstream stage {source.name!r} (kind {source.kind}) wrote no {FINETUNED_MODEL}: the role "
            f"`{role}` names the model a finetune_api stage made"
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise StageError(f"{path} is not JSON: {error}") from None
    model_id, status = (
        (record.get("model_id"), record.get("status")) if isinstance(record, dict) else (None, None)
    )
    if not isinstance(model_id, str) or not model_id:
        raise StageError(f"{path} names no fine-tuned model (`model_id` {model_id!r}, status {status!r})")
    return model_id
