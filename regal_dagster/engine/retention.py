"""Retention: which backups to keep (grandfather-father-son), and pruning the rest.

The planner is pure: given a target's backups, the policy's counts and "now", it decides keep or delete
for each backup, with the reason. For every class (hourly < daily < weekly < monthly) and each of its
last N periods (the period holding "now" is the first), the newest *good* backup of that class or a
higher one started in that period fills the slot and is kept ("daily slot 2026-11-20"). A backup is kept
if any slot keeps it. Whatever the counts say, the newest good backup is kept. Backups that failed their
checks fill no slot; they stay `failed_grace` for investigation, then they go. A backup never checked is
kept until it has been checked once. A target with a rolled-back record (a check record older than
its witnesses know, or a restore-test record deleted: engine/record_sequence.py) keeps every backup until
a fresh record resolves it: which backup is good is in doubt.

One retention truth: `retention_verdict` turns a decision into the date the backup will be deleted (the
first run of the prune schedule at or after the moment the plan stops keeping it), or what keeps it
beyond any date (its condition), and whether it is past its retention (the prune that should have deleted
it ran more than PRUNE_SLACK ago). `list`, `show`, `prune --dry-run/--json/--check`, the Dagster metadata,
the compliance report and the quarterly retention proof all read it.

Deleting a backup survives a crash at any point (`delete_backup`): a sealed deletion mark first (from then on
readers see neither a backup nor damage), then the objects, the manifest last, then the mark; the next prune
finishes any deletion it finds marked (`finish_deletions`). docs/crash-safety.md tells the steps.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

from .audit import audited, completed_backups, record
from .catalog import DELETION_KIND, being_deleted, list_backups
from .check_record import check_status
from .crypto import Keyring, load_keyring
from .documents import seal, write_document
from .errors import LockedError, ObjectLockedError, RegalError
from .holds import Pin, load_holds
from .layout import (
    BACKUPS,
    DELETING_NAME,
    KEYS_LOCK,
    backup_prefix,
    checks_key,
    deleting_key,
    manifest_key,
    prune_log_key,
    restore_test_prefix,
    split_backup_key,
    started_of,
    target_of,
    target_prefix,
)
from .manifest import Manifest
from .policy import RETENTION_CLASSES, Policy
from .record_sequence import KnownRecords, forget_backups, known_records
from .sources.registry import source_for
from .storage import Repository, open_offsite

RANK: dict[str, int] = {name: rank for rank, name in enumerate(RETENTION_CLASSES)}  # hourly 0 ... monthly 3


@dataclass(frozen=True)
class BackupInfo:
    backup_id: str
    started_at: datetime
    retention_class: str
    status: str  # good | failed | unchecked | rolled_back
    locked_until: datetime | None = None  # S3 Object Lock: nothing can delete it before then
    chain: tuple[str, ...] = ()  # an incremental base backup: the backups it is built on, the full one first
    checked_at: datetime | None = None  # when its check record was written (it was kept unchecked until then)


# What keeps a backup beyond any date, strongest first: every backup of a target with a rolled-back record,
# a legal hold without a date (`pin`), a backup never checked, the newest good backup, a backup an incremental kept
# so is built on.
CONDITIONS = ("rolled_back", "legal_hold", "unchecked", "newest_good", "needed_by")


@dataclass(frozen=True)
class Decision:
    backup_id: str
    keep: bool
    reasons: tuple[str, ...]
    # When a kept backup is due to go: the latest end of what keeps it for a time (its slots, its grace, its
    # Object Lock, the incrementals built on it), once whatever keeps it beyond a date (`condition`) is over.
    # None: deleted now, or nothing keeps it for a time beyond now (the condition alone does).
    delete_after: datetime | None = None
    # Deleted now: since when the plan no longer keeps it (displaced by a newer backup in its slot, its
    # slots aged out, its grace over). None for kept backups.
    due_since: datetime | None = None
    condition: str | None = None  # one of CONDITIONS: what keeps it whatever the date (None: only dates do)
    needed_by: str | None = None  # the kept incremental built on it that keeps it longest


def period_of(retention_class: str, when: datetime) -> str:
    """The label of the period (slot) a time falls in, for a class: an hour, a day, an ISO week or a month."""
    if retention_class == "hourly":
        return when.strftime("%Y-%m-%dT%H")
    if retention_class == "daily":
        return when.strftime("%Y-%m-%d")
    if retention_class == "weekly":
        year, week, _ = when.isocalendar()
        return f"{year}-W{week:02d}"
    return when.strftime("%Y-%m")


def period_start(retention_class: str, label: str) -> datetime:
    """When the period a `period_of` label names begins (UTC)."""
    if retention_class == "hourly":
        return datetime.strptime(label, "%Y-%m-%dT%H").replace(tzinfo=UTC)
    if retention_class == "daily":
        return datetime.strptime(label, "%Y-%m-%d").replace(tzinfo=UTC)
    if retention_class == "weekly":
        year, week = label.split("-W")
        return datetime.fromisocalendar(int(year), int(week), 1).replace(tzinfo=UTC)
    return datetime.strptime(label, "%Y-%m").replace(tzinfo=UTC)


def slot_end(retention_class: str, label: str, count: int) -> datetime:
    """When a slot stops being one of the last `count` periods of its class: the start of the period
    `count` periods after it."""
    start = period_start(retention_class, label)
    if retention_class == "monthly":
        months = start.month - 1 + count
        return start.replace(year=start.year + months // 12, month=months % 12 + 1)
    step = {"hourly": timedelta(hours=1), "daily": timedelta(days=1), "weekly": timedelta(weeks=1)}
    return start + step[retention_class] * count


def recent_periods(retention_class: str, now: datetime, count: int) -> list[str]:
    """The labels of the last `count` periods of a class, the one holding `now` first."""
    labels: list[str] = []
    step = {"hourly": timedelta(hours=1), "daily": timedelta(days=1), "weekly": timedelta(weeks=1)}
    cursor = now
    while len(labels) < count:
        label = period_of(retention_class, cursor)
        if not labels or labels[-1] != label:
            labels.append(label)
        if retention_class == "monthly":
            cursor = (cursor.replace(day=1) - timedelta(days=1))
        else:
            cursor -= step[retention_class]
    return labels


@dataclass
class _Keep:
    """What keeps one backup while the plan is made: reasons, dated ends, conditions."""

    reasons: list[str] = field(default_factory=list)
    ends: list[datetime] = field(default_factory=list)
    conditions: set[str] = field(default_factory=set)
    needed_by: str | None = None


def plan(backups: list[BackupInfo], counts: Mapping[str, int], now: datetime, *,
         failed_grace: timedelta = timedelta(days=7), hold: str | None = None,
         pins: Mapping[str, Pin] | None = None) -> list[Decision]:
    """Keep or delete, with reasons and the date each kept backup is due to go, for every backup (in the
    order given). A backup never checked is kept until it is (the daily verification checks every unchecked
    backup). `hold`: why every backup stays (a restore-test record rolled back); a backup whose check record
    is rolled back holds them all too."""
    keeps = {b.backup_id: _Keep() for b in backups}
    good = sorted((b for b in backups if b.status == "good"), key=lambda b: (b.started_at, b.backup_id))
    for retention_class in RETENTION_CLASSES:
        slots = set(recent_periods(retention_class, now, counts.get(retention_class, 0)))
        fillers: dict[str, BackupInfo] = {}
        for backup in good:  # oldest first: the newest in each period wins
            if RANK[backup.retention_class] >= RANK[retention_class] and backup.started_at <= now:
                label = period_of(retention_class, backup.started_at)
                if label in slots:
                    fillers[label] = backup
        for label, backup in fillers.items():
            keeps[backup.backup_id].reasons.append(f"{retention_class} slot {label}")
            keeps[backup.backup_id].ends.append(slot_end(retention_class, label, counts.get(retention_class, 0)))
    if good:
        keeps[good[-1].backup_id].reasons.append("the newest good backup")
        keeps[good[-1].backup_id].conditions.add("newest_good")
    for backup in backups:
        keep = keeps[backup.backup_id]
        if backup.status == "failed" and now - backup.started_at < failed_grace:
            keep.reasons.append(f"failed its checks: kept {failed_grace.days} days for investigation")
            keep.ends.append(backup.started_at + failed_grace)
        if backup.status == "unchecked":
            keep.reasons.append("not checked yet: kept until it is")
            keep.conditions.add("unchecked")
        if backup.locked_until is not None and now < backup.locked_until:
            keep.reasons.append(f"object lock until {backup.locked_until:%Y-%m-%d %H:%M}")
            keep.ends.append(backup.locked_until)
        if (pin := (pins or {}).get(backup.backup_id)) is not None and pin.active(now):
            keep.reasons.append(f"legal hold: {pin.reason}" + (f" (until {pin.until:%Y-%m-%d %H:%M})"
                                                                if pin.until else ""))
            if pin.until is None:
                keep.conditions.add("legal_hold")
            else:
                keep.ends.append(pin.until)
    hold = hold or next((f"the check record of {b.backup_id} was rolled back" for b in backups
                         if b.status == "rolled_back"), None)
    for backup in backups if hold else []:
        keeps[backup.backup_id].reasons.append(f"every backup of the target is kept: {hold} (a fresh record "
                                               "resolves it)")
        keeps[backup.backup_id].conditions.add("rolled_back")
    _keep_parents(backups, keeps)
    due = _due_since(backups, good, counts, now, failed_grace)
    decisions = []
    for b in backups:
        keep = keeps[b.backup_id]
        latest = max(keep.ends, default=None)
        condition = next((c for c in CONDITIONS if c in keep.conditions), None)
        delete_after = latest if latest is not None and (condition is None or latest > now) else None
        decisions.append(Decision(b.backup_id, bool(keep.reasons), tuple(keep.reasons) or (_why_not(b),),
                                  delete_after if keep.reasons else None,
                                  None if keep.reasons else due[b.backup_id], condition, keep.needed_by))
    return decisions


def _keep_parents(backups: list[BackupInfo], keeps: dict[str, _Keep]) -> None:
    """A kept incremental keeps every backup it is built on, for as long as it is kept itself: a restore of it
    combines them all. The parent is needed by the incremental that keeps it longest (one with a condition
    keeps it beyond any date)."""
    kept = sorted((b for b in backups if keeps[b.backup_id].reasons), key=lambda b: (b.started_at, b.backup_id))
    for child in kept:
        own = keeps[child.backup_id]
        for parent in (p for p in child.chain if p in keeps):
            keep = keeps[parent]
            child_end, parent_end = max(own.ends, default=None), max(keep.ends, default=None)
            if own.conditions or (child_end is not None and (parent_end is None or child_end >= parent_end)):
                keep.needed_by = child.backup_id
            keep.reasons.append(f"parent of the incremental {child.backup_id}")
            keep.ends.extend(own.ends)
            if own.conditions:
                keep.conditions.add("needed_by")


def _due_since(backups: list[BackupInfo], good: list[BackupInfo], counts: Mapping[str, int], now: datetime,
               failed_grace: timedelta) -> dict[str, datetime]:
    """For every backup, when the plan stops keeping it (meaningful for those it no longer keeps): the
    latest of the ends of what kept it once. A good backup kept a slot until a newer good backup of its
    class or higher took that slot, or until the slot aged out; it was the newest good backup until the
    next good one; it was kept unchecked until its check; a failed one had its grace; a locked one its lock;
    a parent was kept by the incrementals built on it."""
    due: dict[str, datetime] = {}
    for backup in backups:
        ends = [backup.started_at]
        if backup.status == "failed":
            ends.append(backup.started_at + failed_grace)
        if backup.checked_at is not None:
            ends.append(min(backup.checked_at, now))
        if backup.locked_until is not None:
            ends.append(min(backup.locked_until, now))
        due[backup.backup_id] = max(ends)
    eligible = [b for b in good if b.started_at <= now]  # oldest first
    for older, newer in pairwise(eligible):  # the newest good backup until the next was good (checked)
        good_since = min(newer.checked_at, now) if newer.checked_at else newer.started_at
        due[older.backup_id] = max(due[older.backup_id], newer.started_at, good_since)
    for retention_class in RETENTION_CLASSES:
        count = counts.get(retention_class, 0)
        if not count:
            continue
        periods: dict[str, list[BackupInfo]] = {}
        for backup in eligible:
            if RANK[backup.retention_class] >= RANK[retention_class]:
                periods.setdefault(period_of(retention_class, backup.started_at), []).append(backup)
        for label, members in periods.items():
            for older, newer in pairwise(members):  # each held the slot until the next came
                due[older.backup_id] = max(due[older.backup_id], newer.started_at)
            last = members[-1]
            due[last.backup_id] = max(due[last.backup_id], min(slot_end(retention_class, label, count), now))
    own = dict(due)
    for child in backups:  # an incremental kept what it is built on until it was due itself
        for parent in (p for p in child.chain if p in due):
            due[parent] = max(due[parent], own[child.backup_id])
    return due


def _why_not(backup: BackupInfo) -> str:
    if backup.status == "failed":
        return "failed its checks; past the investigation period"
    return "no retention slot keeps it any more"


# --- the one retention truth -----------------------------------------------------------------------

PRUNE_SLACK = timedelta(hours=1)  # how long a prune may take before what it should have deleted is "past"

_KEPT_BY = {"rolled_back": "a record of the target was rolled back, until a fresh record resolves it",
            "unchecked": "unchecked, until checked", "newest_good": "the newest good backup",
            "legal_hold": "a legal hold (pinned)"}


@dataclass(frozen=True)
class RetentionVerdict:
    """What retention says of one backup: what list, show, prune --dry-run/--json, Dagster and the report show
    (`to_json` is the one schema, docs/cli-json.md)."""

    backup_id: str
    keep: bool
    state: str  # due | past_retention | rolled_back | legal_hold | unchecked | newest_good | needed_by | object_lock |
    #             failed | slot
    reasons: tuple[str, ...]
    delete_after: datetime | None  # kept: when the plan stops keeping it, once its condition is over
    due_since: datetime | None  # not kept: since when
    deletion_at: datetime | None  # the run of the prune schedule that deletes it (None: a condition keeps it)
    past_retention: bool  # that prune ran more than PRUNE_SLACK ago and the backup is still here
    needed_by: str | None = None  # state needed_by: the incremental built on it that keeps it

    @property
    def summary(self) -> str:
        when = f"{self.deletion_at:%Y-%m-%d %H:%M} UTC" if self.deletion_at else None
        if self.past_retention:
            return f"PAST RETENTION: due since {self.due_since:%Y-%m-%d %H:%M} UTC, the prune of {when} left it"
        if not self.keep:
            return f"deleted by the next prune ({when})"
        kept_by = {**_KEPT_BY, "needed_by": f"needed by {self.needed_by}", "object_lock": "Object Lock",
                   "failed": "failed its checks, for investigation"}.get(self.state, self.reasons[0])
        if when is None:
            return f"kept: {kept_by}"
        return f"kept: {kept_by}, " + ("then " if self.state in CONDITIONS else "") + f"until the prune of {when}"

    def to_json(self) -> dict[str, Any]:
        def iso(when: datetime | None) -> str | None:
            return when.isoformat() if when else None

        return {"backup_id": self.backup_id, "target": target_of(self.backup_id), "keep": self.keep,
                "state": self.state, "summary": self.summary, "deletion_at": iso(self.deletion_at),
                "needed_by": self.needed_by, "reasons": list(self.reasons), "due_since": iso(self.due_since),
                "past_retention": self.past_retention}


def retention_verdict(decision: Decision, prune_cron: str, now: datetime) -> RetentionVerdict:
    """THE retention of one backup: the date (the prune run) that deletes it, or what keeps it beyond any date."""
    from .settings import CronExpression

    expression = CronExpression.parse(prune_cron)
    moment = decision.delete_after if decision.keep else decision.due_since
    deletion = expression.next_match(moment) if moment is not None else None
    past = not decision.keep and deletion is not None and now > deletion + PRUNE_SLACK
    state = ("past_retention" if past else "due" if not decision.keep else decision.condition
             or ("needed_by" if decision.needed_by else None) or _dated_state(decision.reasons))
    return RetentionVerdict(decision.backup_id, decision.keep, state, decision.reasons, decision.delete_after,
                            decision.due_since, deletion, past, decision.needed_by if state == "needed_by" else None)


def _dated_state(reasons: tuple[str, ...]) -> str:
    if any(r.startswith("legal hold") for r in reasons):
        return "legal_hold"
    if any(r.startswith("object lock until") for r in reasons):
        return "object_lock"
    return "failed" if any(r.startswith("failed its checks") for r in reasons) else "slot"


def plan_target(policy: Policy, repo: Repository, keyring: Keyring, target: str, now: datetime) -> list[Decision]:
    """The plan for one target's backups, with the policy's counts and graces, held whole while a record of the
    target is rolled back."""
    known = known_records(policy, repo, keyring, target)
    holds = load_holds(policy, repo, keyring, target)
    hold = known.restore_test_rollback({o.key for o in repo.list(restore_test_prefix(target))}) or holds.problem
    return plan(backup_infos(repo, keyring, target, known), policy.retention.model_dump(), now,
                failed_grace=policy.prune.failed_grace, hold=hold, pins=holds.pins)


def retention_verdicts(policy: Policy, repo: Repository, keyring: Keyring, now: datetime,
                       target: str | None = None) -> dict[str, RetentionVerdict]:
    """Backup id -> its retention verdict, for one target or all."""
    names = [target] if target else sorted(policy.targets)
    return {d.backup_id: retention_verdict(d, policy.prune.cron, now)
            for name in names for d in plan_target(policy, repo, keyring, name, now)}


# --- pruning the repository ------------------------------------------------------------------------

@dataclass
class PruneReport:
    at: datetime
    dry_run: bool
    decisions: dict[str, list[Decision]]  # target -> every backup's decision
    deleted: list[str] = field(default_factory=list)  # backup ids
    leftovers: list[str] = field(default_factory=list)  # objects no manifest names, and unfinished uploads
    locked: list[str] = field(default_factory=list)  # leftovers Object Lock keeps until their date
    offsite_deleted: list[str] = field(default_factory=list)  # backup ids removed from the off-site copy
    damaged: dict[str, str] = field(default_factory=dict)  # backup id -> why its objects were left alone
    running: list[str] = field(default_factory=list)  # targets whose lock was held: their leftovers wait
    # target with a continuous archive (a server's WAL) -> its files no kept backup needs, deleted (dry run: would be)
    wal_deleted: dict[str, int] = field(default_factory=dict)

    past: list[str] = field(default_factory=list)  # backups whose prune already ran and left them (see verdicts)
    finished: list[str] = field(default_factory=list)  # deletions a killed prune started, finished by this one

    @property
    def past_retention(self) -> list[str]:
        """Backups past their retention: the prune that should have deleted them ran, and they are still here
        (after a real prune: none). A backup the plan stopped keeping since the last prune is due, not past:
        the next prune deletes it."""
        return [b for b in self.past if b not in self.deleted]

    def to_json(self) -> dict[str, object]:
        """The prune log. Version 3 adds each decision's `delete_after`, version 4 its `condition` and `needed_by`
        (older logs stay readable: `prune_report` gives them None there)."""
        return {"format": "regal-backup-prune", "version": 4, "at": self.at.isoformat(),
                "dry_run": self.dry_run,
                "decisions": {t: [{"backup_id": d.backup_id, "keep": d.keep, "reasons": list(d.reasons),
                                   "delete_after": d.delete_after.isoformat() if d.delete_after else None,
                                   "condition": d.condition, "needed_by": d.needed_by}
                                  for d in ds]
                              for t, ds in self.decisions.items()},
                "deleted": self.deleted, "leftovers_deleted": self.leftovers, "locked_leftovers": self.locked,
                "offsite_deleted": self.offsite_deleted, "damaged": self.damaged, "running": self.running,
                "wal_deleted": self.wal_deleted, "deletions_finished": self.finished}


def prune_report(document: dict[str, Any]) -> PruneReport:
    """A prune log's body (once its seal holds) as written by any version: 2 has no `delete_after`, 2 and 3 no
    `condition` nor `needed_by`."""
    if document.get("format") != "regal-backup-prune" or document.get("version") not in (2, 3, 4):
        raise RegalError("not a prune log this version of regal-backup can read",
                         "upgrade regal-backup to the version that wrote it")

    def decision(d: dict[str, Any]) -> Decision:
        after = d.get("delete_after")
        when = datetime.fromisoformat(after) if after else None
        return Decision(d["backup_id"], d["keep"], tuple(d["reasons"]), when, None, d.get("condition"),
                        d.get("needed_by"))

    decisions = {target: [decision(d) for d in rows] for target, rows in document["decisions"].items()}
    return PruneReport(datetime.fromisoformat(document["at"]), document["dry_run"], decisions,
                       list(document.get("deleted", [])), list(document.get("leftovers_deleted", [])),
                       list(document.get("locked_leftovers", [])), list(document.get("offsite_deleted", [])),
                       dict(document.get("damaged", {})), list(document.get("running", [])),
                       finished=list(document.get("deletions_finished", [])))


def backup_infos(repo: Repository, keyring: Keyring, target: str,
                 known: KnownRecords | None = None) -> list[BackupInfo]:
    manifests, _ = list_backups(repo, keyring, target)
    known = known if known is not None else known_records(None, repo, keyring, target)
    infos = []
    for m in manifests:
        status = check_status(repo, keyring, m, known)
        infos.append(BackupInfo(m.backup_id, m.started_at, m.retention_class, status.status, m.locked_until,
                                tuple(m.source.get("chain", ())), status.record.checked_at if status.record else None))
    return infos


DELETION_FORMAT = "regal-backup-deletion"


def delete_backup(repo: Repository, keyring: Keyring, target: str, backup_id: str, at: datetime,
                  reason: str = "") -> None:
    """Delete a backup so that a crash at any point leaves either the backup as it was or a deletion the next
    prune finishes, never a half-deleted backup that looks valid or damaged:

    1. a sealed deletion mark (`deleting.json`, kind `backup-deletion`): from then on readers see neither a
       backup nor damage (`catalog.being_deleted`);
    2. every other object, the check record included;
    3. the manifest;
    4. the mark (a local repository's emptied directories go with the last file).

    Called again on a marked backup (`finish_deletions`), it resumes at step 2."""
    mark, mkey = deleting_key(target, backup_id), manifest_key(target, backup_id)
    if not being_deleted(repo, keyring, target, backup_id):
        write_document(repo, keyring, DELETION_KIND, mark, {"format": DELETION_FORMAT, "version": 1,
                                                             "backup_id": backup_id, "at": at.isoformat(),
                                                             "reason": reason})
    for stored in sorted(repo.list(backup_prefix(target, backup_id)), key=lambda o: o.key):
        if stored.key not in (mark, mkey):
            repo.delete(stored.key)
    repo.delete(mkey)
    repo.delete(mark)


def marked_for_deletion(repo: Repository, keyring: Keyring, target: str) -> list[str]:
    """The target's backups a prune marked for deletion and did not finish (killed, or stopped by an error)."""
    return sorted(parts[1] for stored in repo.list(target_prefix(target))
                  if (parts := split_backup_key(stored.key)) is not None and parts[2] == DELETING_NAME
                  and being_deleted(repo, keyring, target, parts[1]))


def finish_deletions(policy: Policy, repo: Repository, keyring: Keyring, target: str, report: PruneReport,
                     secondary: Repository | None) -> None:
    """Finish what a killed prune started, here and in the off-site copy: no manual step. An object Object
    Lock still keeps stops that backup's deletion until its date (listed as locked); the mark stays."""
    for store in [repo, *([secondary] if secondary is not None else [])]:
        for backup_id in marked_for_deletion(store, keyring, target):
            try:
                if store is repo:
                    with audited(policy, repo, "backup_deleted", backup_id) as details:
                        details["reason"] = "finishing the deletion an interrupted prune started"
                        delete_backup(store, keyring, target, backup_id, report.at)
                    report.finished.append(backup_id)
                else:
                    delete_backup(store, keyring, target, backup_id, report.at)
                    report.offsite_deleted.append(backup_id)
            except ObjectLockedError:
                report.locked.append(backup_prefix(target, backup_id))


@dataclass
class Leftovers:
    """What prune may remove, and what it must leave alone (and say why)."""

    objects: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # backup id -> why its unnamed objects stay


def leftover_objects(repo: Repository, keyring: Keyring, target: str, now: datetime, grace: timedelta,
                     completed: set[str]) -> Leftovers:
    """Objects of a target no backup needs, once the backup they belong to started longer than `grace` ago;
    and, whatever their age, the backups whose objects must stay because something is wrong with them.

    Removed: the objects of a backup that never got a manifest (interrupted: the caller holds the target's
    lock, so none is running) unless something says it completed (a check record, or a successful backup in
    the audit trail: `completed`); and objects a manifest does not name (left by an interrupted
    re-encryption), but only when that manifest authenticates, names no retired key and every object it
    names is there. Anything else is evidence of tampering or damage: kept, with the reason. Each manifest
    is read here, under the keys lock: a re-encryption may have renamed the objects since any listing."""
    by_backup: dict[str, list[str]] = {}
    for stored in repo.list(target_prefix(target)):
        if (parts := split_backup_key(stored.key)) is not None:
            by_backup.setdefault(parts[1], []).append(stored.key)
    found = Leftovers()
    for backup_id, keys in sorted(by_backup.items()):
        started = started_of(backup_id)
        old_enough = started is not None and now - started >= grace
        mkey = manifest_key(target, backup_id)
        if deleting_key(target, backup_id) in keys and being_deleted(repo, keyring, target, backup_id):
            continue  # a deletion not finished (Object Lock?): finish_deletions takes it, not the sweep
        if mkey not in keys:
            if checks_key(backup_id) in keys or backup_id in completed:
                found.kept[backup_id] = "its manifest is missing although the backup completed: deleted?"
            elif old_enough:
                found.objects += keys
            continue
        try:
            manifest = Manifest.from_bytes(repo.get_bytes(mkey), mkey, keyring)
        except RegalError as exc:
            found.kept[backup_id] = f"its manifest is refused: {exc.message}"
            continue
        retired = [o.key for o in manifest.objects if (k := keyring.history.get(o.encryption.key_id)) and k.retired_at]
        missing = [o.key for o in manifest.objects if o.key not in keys]
        if retired or missing:
            found.kept[backup_id] = ("its manifest names objects under a retired key (an older manifest put back?)"
                                     if retired else f"its manifest names {len(missing)} missing object(s)")
            continue
        named = {o.key for o in manifest.objects}
        if old_enough:
            found.objects += [k for k in keys if k not in named and k not in (mkey, checks_key(backup_id))]
    return found


def _sweep(policy: Policy, store: Repository, locks: Repository, keyring: Keyring, now: datetime,
           report: PruneReport) -> None:
    """Leftover objects and unfinished uploads (partial files, multipart uploads) older than the grace, target
    by target, each under the target's lock in the primary repository (`locks`): a running backup's objects,
    here or on their way off-site, are never taken for leftovers."""
    grace = policy.prune.orphan_grace
    completed = completed_backups(policy, store)
    uploads = store.abandoned_uploads(now - grace)
    _remove(store, [u for u in uploads if not u.startswith(BACKUPS)], [], report)  # documents, reports
    for target in sorted(policy.targets):
        try:
            with locks.lock(target):
                found = leftover_objects(store, keyring, target, now, grace, completed)
                report.damaged.update(found.kept)
                _remove(store, [u for u in uploads if u.startswith(target_prefix(target))], found.objects, report)
        except LockedError:
            report.running.append(target)  # its unfinished objects wait for the next prune


def _remove(store: Repository, uploads: list[str], objects: list[str], report: PruneReport) -> None:
    if report.dry_run:
        report.leftovers += objects + uploads
        return
    for upload in uploads:
        store.discard_upload(upload)
        report.leftovers.append(upload)
    for key in objects:
        try:
            store.delete(key)
            report.leftovers.append(key)
        except ObjectLockedError:
            report.locked.append(key)


def run_prune(policy: Policy, repo: Repository, now: datetime, *, dry_run: bool = False,
              keyring: Keyring | None = None) -> PruneReport:
    """Delete what the plan says (here and in the off-site copy), and what no backup needs; record it all
    in the repository under prune/ (not on a dry run)."""
    report = PruneReport(now, dry_run, {})
    secondary = open_offsite(policy)
    keyring = keyring or load_keyring(policy)
    for target in sorted(policy.targets):
        decisions = plan_target(policy, repo, keyring, target, now)
        report.decisions[target] = decisions
        report.past += [d.backup_id for d in decisions if retention_verdict(d, policy.prune.cron, now).past_retention]
        archive = source_for(policy.target(target).kind).continuous_archive()
        if archive is not None:  # what no kept backup can replay goes with them
            kept = {d.backup_id for d in decisions if d.keep}
            deleted = archive.prune(policy, repo, keyring, target, kept, dry_run=dry_run)
            if deleted is not None:
                report.wal_deleted[target] = deleted
        if dry_run:
            continue
        finish_deletions(policy, repo, keyring, target, report, secondary)
        for decision in decisions:
            if not decision.keep:
                with audited(policy, repo, "backup_deleted", decision.backup_id) as details:
                    details["reason"] = "; ".join(decision.reasons)
                    delete_backup(repo, keyring, target, decision.backup_id, now, details["reason"])
                report.deleted.append(decision.backup_id)
        forget_backups(repo, keyring, target, [d.backup_id for d in decisions if not d.keep])
        if secondary is not None:  # the copy keeps what the primary keeps, and nothing more
            kept = {d.backup_id for d in decisions if d.keep}
            for manifest in list_backups(secondary, keyring, target)[0]:
                if manifest.backup_id not in kept and (manifest.locked_until is None or manifest.locked_until <= now):
                    delete_backup(secondary, keyring, target, manifest.backup_id, now, "off-site: not kept")
                    report.offsite_deleted.append(manifest.backup_id)
    try:
        with repo.lock(KEYS_LOCK):
            for store in [repo, *([secondary] if secondary is not None else [])]:
                _sweep(policy, store, repo, keyring, now, report)
    except LockedError:
        pass  # a key retirement is re-encrypting: it writes objects no manifest names yet; the next prune sweeps
    return _finish(policy, repo, keyring, report)


PRUNE_LOG_KIND = "prune-log"


def _finish(policy: Policy, repo: Repository, keyring: Keyring, report: PruneReport) -> PruneReport:
    """The log goes into the repository sealed, and its SHA-256 into the audit trail: a report believes a
    prune log when its seal holds and the hash-chained trail recorded it."""
    log: dict[str, str] = {}
    if not report.dry_run:
        key = prune_log_key(report.at)
        body = seal(keyring, PRUNE_LOG_KIND, key, report.to_json())
        repo.put_bytes(key, body)
        log = {"log": key, "log_sha256": hashlib.sha256(body).hexdigest()}
    record(policy, repo, "retention_check" if report.dry_run else "prune", "repository",
           "failure" if report.dry_run and report.past_retention else "success",
           {"deleted": report.deleted, "leftovers_removed": len(report.leftovers), "locked": len(report.locked),
            "offsite_deleted": report.offsite_deleted, "past_retention": report.past_retention,
            "damaged": report.damaged, "deletions_finished": report.finished,
            "kept": sum(d.keep for ds in report.decisions.values() for d in ds), **log})
    return report
