"""The compliance frameworks: every module under engine/compliance/frameworks/ with a `FRAMEWORK`, keyed by
its module name and ordered by its `position`."""

from __future__ import annotations

import functools

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


def frameworks() -> dict[str, Framework]:
    """Every framework by key (its module's name), in the order the report lists their verdicts."""
    return dict(_frameworks())


def citations_of(control_id: str) -> tuple[str, ...]:
    """Every framework requirement `control_id` meets, as the report cites them."""
    ordered = sorted(_frameworks().values(), key=lambda f: f.mapping_order)
    return tuple(citation for framework in ordered for citation in framework.citations(control_id))


def frameworks_citing(mapping: list[str] | tuple[str, ...]) -> set[str]:
    """The keys of the frameworks whose requirements are among `mapping`'s citations."""
    return {key for key, framework in _frameworks().items()
            if any(f"{framework.citation} {requirement}" in mapping for requirement in framework.requirements)}
