"""Retention: which backups to keep (grandfather-father-son), and pruning the rest.

The planner is pure: given a target's backups, the policy's counts and "now", it decides keep or delete
for each backup, with the reason. For every class (hourly < daily < weekly < monthly) and each of its
last N periods (the period holding "now" is the first), the newest *good* backup of that class or a
higher one started in that period fills the slot and is kept ("daily slot 2026-11-20"). A backup is kept
if any slot keeps it. Whatever the counts say, the newest good backup is kept. Backups that failed their
checks fill no slot; they stay `failed_grace` for investigation, unchecked ones `unchecked_grace` (their
checks may still be running), then they go. A target with a rolled-back record (a check record older than
its witnesses know, or a restore-test record deleted: engine/record_sequence.py) keeps every backup until
a fresh record resolves it: which backup is good is in doubt.

One retention truth: `retention_verdicts` turns the plan into the date each backup will be deleted (the
first run of the prune schedule at or after the moment the plan stops keeping it), and whether it is past
its retention (the prune that should have deleted it ran more than PRUNE_SLACK ago). `list`, `show`,
`prune --dry-run`, `prune --check` and the quarterly retention proof all read it.

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
from .checks import check_status
from .crypto import Keyring, load_keyring
from .documents import seal, write_document
from .errors import LockedError, ObjectLockedError, RegalError
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


@dataclass(frozen=True)
class Decision:
    backup_id: str
    keep: bool
    reasons: tuple[str, ...]
    # When a kept backup is due to go if nothing newer displaces it sooner: the latest end of what keeps
    # it (its slots, its grace, its Object Lock). None: deleted now, or kept with no end in sight (the
    # newest good backup stays until a newer one is good).
    delete_after: datetime | None = None
    # Deleted now: since when the plan no longer keeps it (displaced by a newer backup in its slot, its
    # slots aged out, its grace over). None for kept backups.
    due_since: datetime | None = None


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


def plan(backups: list[BackupInfo], counts: Mapping[str, int], now: datetime, *,
         failed_grace: timedelta = timedelta(days=7), unchecked_grace: timedelta = timedelta(days=1),
         hold: str | None = None) -> list[Decision]:
    """Keep or delete, with reasons and the date each kept backup is due to go, for every backup (in the
    order given). `hold`: why every backup stays (a restore-test record rolled back); a backup whose check
    record is rolled back holds them all too."""
    reasons: dict[str, list[str]] = {b.backup_id: [] for b in backups}
    ends: dict[str, list[datetime | None]] = {b.backup_id: [] for b in backups}  # None: no end in sight
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
            reasons[backup.backup_id].append(f"{retention_class} slot {label}")
            ends[backup.backup_id].append(slot_end(retention_class, label, counts.get(retention_class, 0)))
    if good:
        reasons[good[-1].backup_id].append("the newest good backup")
        ends[good[-1].backup_id].append(None)
    for backup in backups:
        age = now - backup.started_at
        if backup.status == "failed" and age < failed_grace:
            reasons[backup.backup_id].append(f"failed its checks: kept {failed_grace.days} days for investigation")
            ends[backup.backup_id].append(backup.started_at + failed_grace)
        if backup.status == "unchecked" and age < unchecked_grace:
            reasons[backup.backup_id].append("not checked yet")
            ends[backup.backup_id].append(backup.started_at + unchecked_grace)
        if backup.locked_until is not None and now < backup.locked_until:
            reasons[backup.backup_id].append(f"object lock until {backup.locked_until:%Y-%m-%d %H:%M}")
            ends[backup.backup_id].append(backup.locked_until)
    hold = hold or next((f"the check record of {b.backup_id} was rolled back" for b in backups
                         if b.status == "rolled_back"), None)
    for backup in backups if hold else []:
        reasons[backup.backup_id].append(f"every backup of the target is kept: {hold} (a fresh record resolves it)")
        ends[backup.backup_id].append(None)
    _keep_parents(backups, reasons, ends)
    due = _due_since(backups, good, counts, now, failed_grace, unchecked_grace)
    return [Decision(b.backup_id, bool(reasons[b.backup_id]), tuple(reasons[b.backup_id]) or (_why_not(b),),
                     _latest(ends[b.backup_id]), None if reasons[b.backup_id] else due[b.backup_id])
            for b in backups]


def _keep_parents(backups: list[BackupInfo], reasons: dict[str, list[str]],
                  ends: dict[str, list[datetime | None]]) -> None:
    """A kept incremental keeps every backup it is built on, for as long as it is kept itself: a restore of it
    combines them all."""
    kept = [b for b in backups if reasons[b.backup_id]]
    for child in kept:
        child_ends = list(ends[child.backup_id])
        for parent in child.chain:
            if parent in reasons:
                reasons[parent].append(f"parent of the incremental {child.backup_id}")
                ends[parent].extend(child_ends)


def _due_since(backups: list[BackupInfo], good: list[BackupInfo], counts: Mapping[str, int], now: datetime,
               failed_grace: timedelta, unchecked_grace: timedelta) -> dict[str, datetime]:
    """For every backup, when the plan stops keeping it (meaningful for those it no longer keeps): the
    latest of the ends of what kept it once. A good backup kept a slot until a newer good backup of its
    class or higher took that slot, or until the slot aged out; it was the newest good backup until the
    next good one; a failed or unchecked one had its grace; a locked one its lock."""
    due: dict[str, datetime] = {}
    for backup in backups:
        ends = [backup.started_at]
        if backup.status == "failed":
            ends.append(backup.started_at + failed_grace)
        elif backup.status == "unchecked":
            ends.append(backup.started_at + unchecked_grace)
        if backup.locked_until is not None:
            ends.append(min(backup.locked_until, now))
        due[backup.backup_id] = max(ends)
    eligible = [b for b in good if b.started_at <= now]  # oldest first
    for older, newer in pairwise(eligible):  # the newest good backup until the next
        due[older.backup_id] = max(due[older.backup_id], newer.started_at)
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
    return due


def _latest(ends: list[datetime | None]) -> datetime | None:
    return None if not ends or None in ends else max(e for e in ends if e is not None)


def _why_not(backup: BackupInfo) -> str:
    if backup.status == "failed":
        return "failed its checks; past the investigation period"
    if backup.status == "unchecked":
        return "never checked; past the grace period"
    return "no retention slot keeps it any more"


# --- the one retention truth -----------------------------------------------------------------------

PRUNE_SLACK = timedelta(hours=1)  # how long a prune may take before what it should have deleted is "past"


@dataclass(frozen=True)
class RetentionVerdict:
    """What retention says of one backup, with dates: what list, show, prune --dry-run and --check print."""

    backup_id: str
    keep: bool
    reasons: tuple[str, ...]
    delete_after: datetime | None  # kept: when the plan stops keeping it, if nothing newer comes sooner
    due_since: datetime | None  # not kept: since when
    deletion_at: datetime | None  # the run of the prune schedule that deletes it (None: no end in sight)
    past_retention: bool  # that prune ran more than PRUNE_SLACK ago and the backup is still here

    @property
    def summary(self) -> str:
        when = f"{self.deletion_at:%Y-%m-%d %H:%M} UTC" if self.deletion_at else None
        if self.past_retention:
            return f"PAST RETENTION: due since {self.due_since:%Y-%m-%d %H:%M} UTC, the prune of {when} left it"
        if not self.keep:
            return f"deleted by the next prune ({when})"
        if when is None:
            return "kept: the newest good backup (until a newer one is good)"
        return f"kept until the prune of {when}"

    def to_json(self) -> dict[str, Any]:
        def iso(when: datetime | None) -> str | None:
            return when.isoformat() if when else None

        return {"keep": self.keep, "reasons": list(self.reasons), "delete_after": iso(self.delete_after),
                "due_since": iso(self.due_since), "deletion_at": iso(self.deletion_at),
                "past_retention": self.past_retention, "summary": self.summary}


def retention_verdict(decision: Decision, prune_cron: str, now: datetime) -> RetentionVerdict:
    from .settings import CronExpression

    expression = CronExpression.parse(prune_cron)
    moment = decision.delete_after if decision.keep else decision.due_since
    deletion = expression.next_match(moment) if moment is not None else None
    past = not decision.keep and deletion is not None and now > deletion + PRUNE_SLACK
    return RetentionVerdict(decision.backup_id, decision.keep, decision.reasons, decision.delete_after,
                            decision.due_since, deletion, past)


def plan_target(policy: Policy, repo: Repository, keyring: Keyring, target: str, now: datetime) -> list[Decision]:
    """The plan for one target's backups, with the policy's counts and graces, held whole while a record of the
    target is rolled back."""
    known = known_records(policy, repo, keyring, target)
    hold = known.restore_test_rollback({o.key for o in repo.list(restore_test_prefix(target))})
    return plan(backup_infos(repo, keyring, target, known), policy.retention.model_dump(), now,
                failed_grace=policy.prune.failed_grace, unchecked_grace=policy.prune.unchecked_grace, hold=hold)


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
        """The prune log. Version 3 adds each decision's `delete_after` (version 2 logs stay readable:
        `prune_report` gives them None there)."""
        return {"format": "regal-backup-prune", "version": 3, "at": self.at.isoformat(),
                "dry_run": self.dry_run,
                "decisions": {t: [{"backup_id": d.backup_id, "keep": d.keep, "reasons": list(d.reasons),
                                   "delete_after": d.delete_after.isoformat() if d.delete_after else None}
                                  for d in ds]
                              for t, ds in self.decisions.items()},
                "deleted": self.deleted, "leftovers_deleted": self.leftovers, "locked_leftovers": self.locked,
                "offsite_deleted": self.offsite_deleted, "damaged": self.damaged, "running": self.running,
                "wal_deleted": self.wal_deleted, "deletions_finished": self.finished}


def prune_report(document: dict[str, Any]) -> PruneReport:
    """A prune log's body (once its seal holds) as written by any version: 2 has no `delete_after`."""
    if document.get("format") != "regal-backup-prune" or document.get("version") not in (2, 3):
        raise RegalError("not a prune log this version of regal-backup can read",
                         "upgrade regal-backup to the version that wrote it")

    def decision(d: dict[str, Any]) -> Decision:
        after = d.get("delete_after")
        when = datetime.fromisoformat(after) if after else None
        return Decision(d["backup_id"], d["keep"], tuple(d["reasons"]), when)

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
    return [BackupInfo(m.backup_id, m.started_at, m.retention_class, check_status(repo, keyring, m, known).status,
                       m.locked_until, tuple(m.source.get("chain", ()))) for m in manifests]


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
