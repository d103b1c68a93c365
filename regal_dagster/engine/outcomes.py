"""What a check finds, and what a check is: shared by the generic checks (engine/checks.py) and the checks
a source kind adds (its `checks` in engine/sources/<kind>/)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ERROR, WARN = "ERROR", "WARN"


@dataclass(frozen=True)
class CheckSpec:
    """A check every backup of a kind gets. `decides_good`: a failure makes the backup not good (it blocks
    in Dagster and no longer counts for the RPO, retention or restore tests)."""

    severity: str  # ERROR | WARN
    decides_good: bool
    description: str  # for people: what it proves


@dataclass
class CheckOutcome:
    name: str
    passed: bool
    description: str  # what was found, for people
    failing_object: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    level: str | None = None  # a severity other than the check's usual one (key_cryptoperiod: ERROR once past)

    @property
    def severity(self) -> str:
        """ERROR or WARN: the check's usual severity (common or its kind's), unless this outcome says otherwise."""
        from .checks import check_spec

        return self.level or check_spec(self.name).severity
