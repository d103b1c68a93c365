"""What a compliance framework declares: its name, how its requirements are cited, which of our controls
meet each requirement, and the rule that turns those controls' results into its verdict."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..results import FAIL, NOT_TESTED, OUT_OF_SCOPE, PASS


def framework_verdict(results: Iterable[str]) -> str:
    """A framework passes only when every control mapped to it passes: any FAIL fails it; otherwise any
    NOT TESTED (or no control at all) leaves it NOT TESTED."""
    results = list(results)
    if results and all(r == OUT_OF_SCOPE for r in results):
        return OUT_OF_SCOPE
    if FAIL in results:
        return FAIL
    if not results or NOT_TESTED in results:
        return NOT_TESTED
    return PASS


@dataclass(frozen=True)
class Framework:
    name: str  # as the report names it, with its version: "PCI DSS 4.0.1"
    citation: str  # what precedes a requirement's identifier where the report cites it: "PCI DSS" 3.5.1
    requirements: dict[str, tuple[str, ...]]  # requirement identifier -> the controls that meet it (e.g. BK-01)
    position: int  # where its verdict stands among the frameworks' (lowest first)
    matrix_position: int | None = None  # where its requirements stand in a control's mapping (default: position)
    verdict: Callable[[Iterable[str]], str] = framework_verdict  # its requirements' results -> its verdict
    # requirement -> why nothing we record evidences it (a requirement mapped to no control is NOT TESTED)
    untested: dict[str, str] = field(default_factory=dict)

    def requirement_results(self, results: dict[str, str]) -> dict[str, str]:
        """Each requirement's result from the results of our controls (control id -> result): it passes
        only when every control meeting it passes; with no control, it is NOT TESTED."""
        unmapped = OUT_OF_SCOPE if results and set(results.values()) == {OUT_OF_SCOPE} else NOT_TESTED
        return {requirement: framework_verdict(results[c] for c in controls if c in results) if controls
                else unmapped for requirement, controls in self.requirements.items()}

    def citations(self, control_id: str) -> list[str]:
        """The requirements `control_id` meets, as the report cites them ("PCI DSS 3.5.1"), in declared order."""
        return [f"{self.citation} {requirement}" for requirement, controls in self.requirements.items()
                if control_id in controls]

    def controls(self) -> set[str]:
        return {control_id for controls in self.requirements.values() for control_id in controls}

    @property
    def mapping_order(self) -> int:
        return self.position if self.matrix_position is None else self.matrix_position
