"""What the controls are judged on (the period's evidence, figures and failures, the chain's verdict), and a
control's judgement."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..audit import ChainVerdict
from ..policy import Policy
from .evidence import Evidence, Period
from .results import FAIL, NOT_TESTED, PASS


@dataclass(frozen=True)
class Judgement:
    passed: bool | None  # None: nothing in the period to test it on
    finding: str

    @property
    def result(self) -> str:
        return NOT_TESTED if self.passed is None else PASS if self.passed else FAIL


@dataclass
class Facts:
    """What the controls are judged on."""

    policy: Policy
    evidence: Evidence
    figures: dict[str, Any]
    failures: list[dict[str, Any]]
    verdict: ChainVerdict
    period: Period
    now: datetime

    @property
    def t(self) -> dict[str, list[dict[str, Any]]]:
        return self.evidence.tables

    @property
    def operation_since(self) -> datetime | None:
        """When the system went into operation (its first audit event)."""
        value = (self.t.get("operation") or [{}])[0].get("in_operation_since")
        return datetime.fromisoformat(value) if value else None

    @property
    def policy_since(self) -> datetime | None:
        value = (self.t.get("operation") or [{}])[0].get("policy_since")
        return datetime.fromisoformat(value) if value else None

    @property
    def out_of_scope(self) -> bool:
        """The period ends before the policy took effect: nothing was required of it."""
        return self.policy_since is None or self.policy_since >= self.at

    @property
    def at(self) -> datetime:
        return self.period.judged_at(self.now)

    def open_failures(self, control_id: str) -> list[dict[str, Any]]:
        return [f for f in self.failures if f["open"] and f["control_id"] == control_id]


FEW = 10  # a finding names at most this many items; the rest are counted (every one is in the evidence's CSVs)


def few(items: list[str], csv: str, sep: str = ", ") -> str:
    """Items for a finding: all of them up to FEW, else the first FEW and how many more `csv` holds ("none": none)."""
    if not items:
        return "none"
    if len(items) <= FEW:
        return sep.join(items)
    return f"{sep.join(items[:FEW])} and {len(items) - FEW} more ({csv})"
