"""The stage graph (`needs:` edges, topological order) and stage cache keys."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from difflib import get_close_matches
from typing import Any

from harness.spec.errors import Mark, Problem, SpecError


class StageGraph:
    """Stages in a stable topological order: ties keep the order written in the spec."""

    def __init__(self, needs: Mapping[str, Mapping[str, str]], mark: Callable[..., Mark | None]):
        """`needs[stage]` maps role -> upstream stage; `mark(stage, role)` locates an edge."""
        self.parents = {name: dict(edges) for name, edges in needs.items()}
        problems = []
        for name, edges in self.parents.items():
            for role, upstream in edges.items():
                if upstream == name:
                    problems.append(
                        Problem(f"stage {name!r} needs itself", mark(name, role), f"stages.{name}.needs")
                    )
                elif upstream not in self.parents:
                    hint = get_close_matches(upstream, list(self.parents), n=1)
                    extra = (
                        f"; did you mean {hint[0]!r}?" if hint else f"; stages are: {', '.join(self.parents)}"
                    )
                    problems.append(
                        Problem(
                            f"unknown stage {upstream!r} in needs{extra}",
                            mark(name, role),
                            f"stages.{name}.needs",
                        )
                    )
        if problems:
            raise SpecError(problems)
        self.order = self._topological(mark)

    def _topological(self, mark: Callable[..., Mark | None]) -> list[str]:
        written = list(self.parents)
        pending = {name: set(edges.values()) for name, edges in self.parents.items()}
        order: list[str] = []
        done: set[str] = set()
        while pending:
            ready = next((n for n in written if n in pending and pending[n] <= done), None)
            if ready is None:
                cycle = self._cycle(pending)
                raise SpecError.at(
                    "cycle in needs: " + " -> ".join(cycle),
                    mark(cycle[0], next(r for r, u in self.parents[cycle[0]].items() if u == cycle[1])),
                    f"stages.{cycle[0]}.needs",
                )
            order.append(ready)
            done.add(ready)
            del pending[ready]
        return order

    def _cycle(self, pending: Mapping[str, set[str]]) -> list[str]:
        node = next(iter(pending))
        path: list[str] = []
        while node not in path:
            path.append(node)
            node = sorted(u for u in self.parents[node].values() if u in pending)[0]
        return path[path.index(node) :] + [node]


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def stage_key(
    *,
    kind: str,
    code_version: str,
    params: Mapping[str, Any],
    seed: int,
    upstream: Mapping[str, Mapping[str, str]],
    inputs: Mapping[str, str],
    fingerprint: str | None = None,
) -> str:
    """Content address of a stage run: same inputs, same key, same artifacts.

    `fingerprint` identifies what the stage loads on this machine (a base model's weights).

    `upstream` maps role -> {"key", "digest"}: the digest of the upstream's outputs is
    included so that a forced rerun with different outputs also reruns what follows.
    """
    material = canonical_json(
        {
            "kind": kind,
            "code_version": code_version,
            "params": params,
            "seed": seed,
            "upstream": upstream,
            "inputs": inputs,
            "fingerprint": fingerprint,
        }
    )
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def without(params: Mapping[str, Any], dotted: tuple[str, ...]) -> dict[str, Any]:
    """A copy of params without the dotted paths in `dotted` (transport settings); a `*` in a
    path stands for every key of a mapping or item of a list (`settings.*.provider.timeout`)."""
    out = json.loads(canonical_json(params))
    for path in dotted:
        *parents, leaf = path.split(".")
        nodes = [out]
        for part in parents:
            nodes = [child for node in nodes for child in _children(node, part)]
        for node in nodes:
            if isinstance(node, dict):
                node.pop(leaf, None)
    return out


def _children(node: Any, part: str) -> list[Any]:
    if part == "*":
        return list(node.values()) if isinstance(node, dict) else node if isinstance(node, list) else []
    return [node[part]] if isinstance(node, dict) and part in node else []
