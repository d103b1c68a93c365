"""The compliance frameworks: every module under engine/compliance/frameworks/ with a `FRAMEWORK`, keyed by
its module name (the id `regal-backup report --framework` and the policy's `reports.frameworks` take) and
ordered by its `position`."""

from __future__ import annotations

import functools
from collections.abc import Iterable

from ...errors import UsageError
from ...plugins import plugin_modules
from .base import Framework


@functools.cache
def _frameworks() -> dict[str, Framework]:
    found = {}
    for module in plugin_modules(__package__):
        framework = getattr(module, "FRAMEWORK", None)
        if isinstance(framework, Framework):
            found[module.__name__.rpartition(".")[2]] = framework
    return dict(sorted(found.items(), key=lambda item: (item[1].position, item[0])))


def frameworks(scope: Iterable[str] | None = None) -> dict[str, Framework]:
    """Every framework by key (its module's name), in the order the report lists their verdicts; only those
    of `scope` (ids) when given: an unknown id is refused, naming the known ones."""
    known = _frameworks()
    if scope is None:
        return dict(known)
    wanted = set(scope)
    if unknown := sorted(wanted - set(known)):
        raise UsageError(f"unknown compliance framework(s): {', '.join(unknown)}",
                         f"name one or more of: {', '.join(known)}")
    return {key: framework for key, framework in known.items() if key in wanted}


def citations_of(control_id: str, scope: Iterable[str] | None = None) -> tuple[str, ...]:
    """Every requirement `control_id` meets (of the frameworks in `scope`, or of all), as the report cites them."""
    ordered = sorted(frameworks(scope).values(), key=lambda f: f.mapping_order)
    return tuple(citation for framework in ordered for citation in framework.citations(control_id))


def frameworks_citing(mapping: list[str] | tuple[str, ...]) -> set[str]:
    """The keys of the frameworks whose requirements are among `mapping`'s citations."""
    return {key for key, framework in _frameworks().items()
            if any(f"{framework.citation} {requirement}" in mapping for requirement in framework.requirements)}
