"""When the system went into operation, and what the period held from then on: the scheduled backup ticks
(each needs its backup: schedule adherence) and each day's coverage ("not in operation" before the system
existed, "covered" when every target has a successful backup that day, else a "gap").

A day or a tick before the system's first audit event is not judged: there was nothing to run it. A period
that ends before the policy took effect (its first `policy_change` event, or the first event of all) is out
of scope as a whole."""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import pairwise
from typing import Any

from ..audit import AuditEvent
from ..policy import Policy
from ..settings import CronExpression, is_first_match_in_month

EARLY = timedelta(minutes=1)  # a backup this much before its tick (clocks, a launcher that starts early) counts


@dataclass(frozen=True)
class Operation:
    since: datetime | None  # the first audit event: the system went into operation
    policy_since: datetime | None  # the first policy_change event (else `since`): the policy took effect

    def to_json(self) -> dict[str, Any]:
        return {"in_operation_since": self.since.isoformat() if self.since else None,
                "policy_since": self.policy_since.isoformat() if self.policy_since else None}


def operation_of(trail_events: list[AuditEvent]) -> Operation:
    since = min((e.at for e in trail_events), default=None)
    changes = [e.at for e in trail_events if e.event_type == "policy_change"]
    return Operation(since, min(changes, default=since))


def scheduled_ticks(policy: Policy, start: datetime, end: datetime) -> list[datetime]:
    """Every minute in [start, end) at which the policy's schedules launch a backup (one per minute, whatever
    the number of classes scheduled then)."""
    ticks: set[datetime] = set()
    for schedule in policy.schedules.values():
        expression = CronExpression.parse(schedule.cron)
        day = start.replace(hour=0, minute=0, second=0, microsecond=0)
        while day < end:
            if expression.matches_day(day) and (
                    not schedule.first_in_month or is_first_match_in_month(schedule.cron, day)):
                for hour in expression.fields[1]:
                    for minute in expression.fields[0]:
                        tick = day.replace(hour=hour, minute=minute)
                        if start <= tick < end:
                            ticks.add(tick)
            day += timedelta(days=1)
    return sorted(ticks)


def schedule_adherence(policy: Policy, backups: Iterable[dict[str, Any]], start: datetime | None,
                       at: datetime) -> list[dict[str, Any]]:
    """Per target: the ticks from `start` (the period's start, or when the system went into operation) whose
    window closed by `at` (a tick's window runs to the next tick), how many of them have a successful backup
    in their window, and the first ticks missed. `start` None: the system was not in operation."""
    if start is None or start >= at:
        return [{"target": t, "scheduled": 0, "met": 0, "missed": 0, "first_missed": []}
                for t in sorted(policy.targets)]
    ticks = scheduled_ticks(policy, start, at + timedelta(days=40))
    windows = [(a, b) for a, b in pairwise(ticks) if b <= at]
    times: dict[str, list[datetime]] = {t: [] for t in policy.targets}
    for row in backups:
        if row["outcome"] == "success" and row["target"] in times:
            times[row["target"]].append(datetime.fromisoformat(row["at"]))
    rows = []
    for target in sorted(policy.targets):
        mine = sorted(times[target])
        missed = []
        for tick, following in windows:
            i = bisect.bisect_left(mine, tick - EARLY)
            if not (i < len(mine) and mine[i] < following):
                missed.append(tick)
        rows.append({"target": target, "scheduled": len(windows), "met": len(windows) - len(missed),
                     "missed": len(missed), "first_missed": [m.isoformat() for m in missed[:3]]})
    return rows


def coverage(policy: Policy, backups: Iterable[dict[str, Any]], period_start: datetime, at: datetime,
             since: datetime | None) -> list[dict[str, Any]]:
    """One row per day of the period up to `at`: "not in operation" (the day ended before the system's
    first event), "covered" (every target has a successful backup that day) or "gap" (naming those without)."""
    backed: dict[str, set[str]] = {}
    for row in backups:
        if row["outcome"] == "success":
            backed.setdefault(row["at"][:10], set()).add(row["target"])
    rows = []
    day = period_start
    while day < at:
        label = f"{day:%Y-%m-%d}"
        if since is None or day + timedelta(days=1) <= since:
            rows.append({"day": label, "state": "not in operation", "without_backup": []})
        else:
            without = sorted(set(policy.targets) - backed.get(label, set()))
            rows.append({"day": label, "state": "gap" if without else "covered", "without_backup": without})
        day += timedelta(days=1)
    return rows


def tier_rows(policy: Policy, backups: list[dict[str, Any]], before: list[dict[str, Any]],
              restore_tests: list[dict[str, Any]], at: datetime) -> list[dict[str, Any]]:
    """Per target: its criticality tier, what the tier requires (backup frequency, RPO, RTO) and what the
    target got in the period: the longest interval between successful backups, the RPO achieved (that, or the
    time from the last one to `at`, whichever is longer) and the slowest restore test."""
    rows = []
    last_before = {r["target"]: datetime.fromisoformat(r["at"]) for r in before}
    ok: dict[str, list[datetime]] = {}
    for r in backups:
        if r["outcome"] == "success":
            ok.setdefault(r["target"], []).append(datetime.fromisoformat(r["at"]))
    tested: dict[str, list[float]] = {}
    for r in restore_tests:
        if r.get("rto_seconds") is not None:
            tested.setdefault(r["target"], []).append(r["rto_seconds"])
    for name in sorted(policy.targets):
        tier = policy.tier_of(name)
        times = sorted(ok.get(name, []))
        if name in last_before:
            times.insert(0, last_before[name])
        intervals = [(b - a).total_seconds() for a, b in pairwise(times)]
        rtos = tested.get(name, [])
        rows.append({
            "target": name, "tier": policy.targets[name].tier,
            "backup_every_seconds": tier.backup_every.total_seconds() if tier else None,
            "rpo_seconds": policy.rpo_for(name).total_seconds(), "rto_seconds": policy.rto_for(name).total_seconds(),
            "longest_interval_seconds": max(intervals, default=None),
            "rpo_achieved_seconds": max([*intervals, (at - times[-1]).total_seconds()]) if times else None,
            "restore_tests": len(rtos), "worst_rto_seconds": max(rtos, default=None)})
    return rows
