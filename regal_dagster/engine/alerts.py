"""Alerts to the ops team: what is wrong now, told once, reminded, and cleared.

A *condition* is something wrong right now (an RPO breach, a failed check, low capacity, a failed backup
run), identified by a stable key. The `AlertBook` compares the conditions of each evaluation with what it
has already told people: a new condition sends an alert, one still open after `remind_after` sends a
reminder, one that is gone sends "resolved". Messages go through an outbox: a channel that fails (SMTP
down, webhook 500) is logged and retried on the next evaluation, and never raises into the pipeline.
The book is plain JSON, so a Dagster sensor keeps it in its cursor and the CLI could keep it in a file.

The channels (e-mail, Slack, a generic JSON webhook, PagerDuty, a local file, ...) are modules of
engine/channels/, found by its registry; secrets come from environment variables and are never logged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from .audit import completed_backups
from .capacity import CapacityForecast, forecast
from .catalog import list_backups, newest_first
from .channels.base import ChannelSettings, Notification
from .channels.registry import send as send_on_channel
from .check_record import check_status
from .crypto import Keyring
from .documents import read_document
from .errors import IntegrityError
from .layout import RESTORE_TEST_KIND, restore_test_prefix, started_of
from .outcomes import ERROR
from .policy import Policy
from .record_sequence import KnownRecords, known_records
from .recoverability import Recoverability, target_recoverability
from .sources.capabilities import ArchiveState, ContinuousArchive
from .sources.registry import source_for
from .storage import Repository

log = logging.getLogger("regal_backup.alerts")

MAX_ATTEMPTS = 30  # deliveries of one message to one channel before it is dropped (and logged)

FIRST_STEPS = {
    "rpo_breach": "Open the last backup run and the backup schedule: are runs failing or not starting? "
                  "Take a backup now with `regal-backup backup {target}`.",
    "backup_failed": "Open the run and read the failed step's error; fix the cause and re-run the backup.",
    "verification_failed": "Take a new backup now (`regal-backup backup {target}`) and keep the damaged one for "
                           "investigation; check the storage for corruption or tampering.",
    "check_failed": "Run `regal-backup verify {backup_id}`; take a new backup now and investigate the repository.",
    "encryption": "Treat this as a possible data exposure: restrict access to the repository, take a new "
                  "backup, and find out how unencrypted data got there.",
    "capacity": "Prune old backups or add storage before backups start failing.",
    "restore_test_failed": "Read the restore test's problems; if the backup does not restore, take a new backup "
                           "now and restore-test it (`regal-backup restore-test --target {target}`).",
    "prune_failed": "Open the run: a backup past its retention must be deleted (PCI DSS 3.2.1); run "
                    "`regal-backup prune --check` to see which and why.",
    "offsite_copy": "Run `regal-backup offsite sync`; if it fails, check access to the off-site repository "
                    "(credentials, region, bucket policy). Until it succeeds there is no second copy.",
    "key_cryptoperiod": "Run `regal-backup keys rotate` (new backups use the new key; old ones stay readable).",
    "report_failed": "Open the run: the audit database unreachable, or the trail broken? Run `regal-backup audit "
                     "verify`, then `regal-backup report --period YYYY-MM`.",
    "drill_failed": "Read the drill record (drills/ in the repository): which target missed its RTO or RPO, and why.",
    "record_rolled_back": "Someone who can write the repository put back an older record or deleted one, to hide "
                          "a failure: do not trust what the repository says of {target}; read the storage's access "
                          "logs and compare with the off-site copy. Prune keeps every backup of {target} until a "
                          "fresh record resolves it: {resolve}.",
    "lost_at_failover": "Transactions the old primary of {target} committed after the new one forked are not on the "
                        "new primary: the stored old-timeline WAL still holds them (`regal-backup wal status "
                        "{target}` names the range). Decide with the application's owners whether to re-apply them "
                        "(restore the old timeline to a scratch server and compare); the alert stays open while the "
                        "range is stored.",
    "damaged_backup": "Do not restore it. Someone or something changed the repository: compare with the off-site "
                      "copy, read the storage's access logs, and check who holds write access. `regal-backup list` "
                      "shows every backup that cannot be trusted.",
}


@dataclass(frozen=True)
class Condition:
    key: str  # stable identity, e.g. rpo:main, check:main:integrity, capacity, run:backup_job
    event: str  # rpo_breach | backup_failed | verification_failed | check_failed | capacity
    target: str  # a target name, or "repository"
    what: str  # one line, for a subject
    link: str  # where to look in the Dagster UI
    first_step: str
    since: datetime | None = None  # when it started; None: when it was first seen
    details: dict[str, Any] = field(default_factory=dict)


def _condition_json(condition: Condition) -> dict[str, Any]:
    body = asdict(condition)
    body["since"] = condition.since.isoformat() if condition.since else None
    return body


@dataclass
class AlertBook:
    """What has been told: open conditions and messages not yet delivered. JSON round-trips."""

    open: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> {condition, since, last_sent}
    outbox: list[dict[str, Any]] = field(default_factory=list)  # {notification, channel, attempts}

    @classmethod
    def from_json(cls, text: str | None) -> AlertBook:
        if not text:
            return cls()
        body = json.loads(text)
        return cls(body.get("open", {}), body.get("outbox", []))

    def to_json(self) -> str:
        return json.dumps({"open": self.open, "outbox": self.outbox}, sort_keys=True)

    def update(self, conditions: list[Condition], now: datetime, remind_after: timedelta,
               channels: int) -> list[Notification]:
        """Compare with what is wrong now; queue alerts, reminders and resolutions for every channel."""
        queued = []
        active = {c.key: c for c in conditions}
        for key, condition in active.items():
            entry = self.open.get(key)
            if entry is None:
                since = (condition.since or now).isoformat()
                self.open[key] = {"condition": _condition_json(condition), "since": since, "last_sent": now.isoformat()}
                queued.append(Notification("alert", _condition_json(condition), since, now.isoformat()))
            else:
                entry["condition"] = _condition_json(condition)  # newest details and link
                if now - datetime.fromisoformat(entry["last_sent"]) >= remind_after:
                    entry["last_sent"] = now.isoformat()
                    queued.append(Notification("reminder", entry["condition"], entry["since"], now.isoformat()))
        for key in [k for k in self.open if k not in active]:
            entry = self.open.pop(key)
            queued.append(Notification("resolved", entry["condition"], entry["since"], now.isoformat()))
        for notification in queued:
            for channel in range(channels):
                self.outbox.append({"notification": asdict(notification), "channel": channel, "attempts": 0})
        return queued

    def deliver(self, send: Callable[[int, Notification], None]) -> list[str]:
        """Try every queued message; keep the ones that failed for the next time. Returns the failures."""
        failures, remaining = [], []
        for item in self.outbox:
            notification = Notification(**item["notification"])
            try:
                send(item["channel"], notification)
            except Exception as exc:  # noqa: BLE001 - a channel must never break the pipeline
                item["attempts"] += 1
                failure = f"channel {item['channel']}: {notification.subject}: {exc}"
                failures.append(failure)
                if item["attempts"] < MAX_ATTEMPTS:
                    remaining.append(item)
                    log.warning("alert not delivered, will retry: %s", failure)
                else:
                    log.error("alert dropped after %d attempts: %s", item["attempts"], failure)
        self.outbox = remaining
        return failures


# --- delivery --------------------------------------------------------------------------------------

def send(channel: ChannelSettings, notification: Notification, resolve_path: Callable[[str], Any]) -> None:
    """Deliver one message on one channel, through the channel registry (engine/channels/); ChannelError
    says why it failed (without secrets), including a channel kind this regal-backup does not know."""
    send_on_channel(channel, notification, resolve_path)


def evaluate_and_notify(policy: Policy, book: AlertBook, conditions: list[Condition], now: datetime) -> list[str]:
    """One evaluation: update the book with the conditions, deliver what is queued. Returns failures."""
    from .audit import record

    channels = policy.alerts.channels
    book.update(conditions, now, policy.alerts.remind_after, len(channels))

    def send_recorded(index: int, notification: Notification) -> None:
        details = {"status": notification.status, "event": notification.condition["event"],
                   "target": notification.condition["target"], "what": notification.condition["what"],
                   "channel": channels[index].kind}
        try:
            send(channels[index], notification, policy.resolve_path)
        except Exception as exc:
            record(policy, None, "alert", notification.condition["key"], "failure", {**details, "error": str(exc)})
            raise
        record(policy, None, "alert", notification.condition["key"], "success", details)

    return book.deliver(send_recorded)


# --- conditions from the repository ----------------------------------------------------------------

def run_link(policy: Policy, run_id: str | None, target: str, kind: str) -> str:
    base = policy.dagster.base_url.rstrip("/")
    return f"{base}/runs/{run_id}" if run_id else f"{base}/assets/{kind}/{target}/backup"


def rpo_conditions(policy: Policy, repo: Repository, keyring: Keyring, now: datetime,
                   models: dict[str, Recoverability] | None = None) -> list[Condition]:
    """A breach per target whose newest recoverable point (engine/recoverability.py) is older than its RPO or that
    has none, or whose continuous archive makes points unrecoverable (a gap, an unreadable segment); and one per
    range of changes its archive stored but lost at a failover. `models`: the targets' models when the caller has
    them."""
    conditions = []
    for target in sorted(policy.targets):
        model = (models or {}).get(target) or target_recoverability(policy, repo, keyring, target, now)
        if (condition := _rpo_condition(policy, model, now)) is not None:
            conditions.append(condition)
        conditions += lost_conditions(policy, model)
    return conditions


def lost_conditions(policy: Policy, model: Recoverability) -> list[Condition]:
    """One condition per range of the continuous archive lost at a failover (stored from the old primary past the
    point the new one forked at), keyed and named by its range: alerted once, open while the range is stored."""
    if model.archive is None or not model.archive.lost:
        return []
    archive = source_for(model.kind).continuous_archive()
    link = (f"{policy.dagster.base_url.rstrip('/')}/assets/{'/'.join(archive.asset(model.target).key)}"
            if archive is not None else f"{policy.dagster.base_url.rstrip('/')}/assets")
    noun = model.archive_noun or "changes"
    conditions = []
    for lost in model.archive.lost:
        where = lost.split(":")[0]  # "timeline 1 from 0/3000000 to 0/3012345 (73541 bytes)"
        conditions.append(Condition(f"lost:{model.target}:{where.split(' (')[0]}", "lost_at_failover", model.target,
                                    f"{model.target}: {noun} lost at a failover: {where}", link,
                                    FIRST_STEPS["lost_at_failover"].format(target=model.target), None,
                                    {"lost": lost}))
    return conditions


def _rpo_condition(policy: Policy, model: Recoverability, now: datetime) -> Condition | None:
    target, rpo = model.target, timedelta(seconds=model.rpo_seconds)
    archive = source_for(model.kind).continuous_archive()
    good = [m for m, s in model.statuses if s.good]
    if archive is not None and model.archive is not None and good:  # the RPO is the archive's (a server's WAL)
        return _archive_rpo_condition(policy, model, archive, model.archive, rpo, now)
    if not model.rpo_breached:
        return None
    point = model.point
    if point is None:
        what = f"{target}: no backup has passed its checks (RPO {rpo})"
        since, details, trigger = None, {}, {}
    else:
        age = now - point.at
        what = f"{target}: newest good backup is {_hours(age)} old, past the RPO of {_hours(rpo)}"
        since, details = point.at + rpo, {"newest_good_backup": point.backup_id}
        trigger = next(m.trigger for m in good if m.backup_id == point.backup_id)
    return Condition(f"rpo:{target}", "rpo_breach", target, what,
                     run_link(policy, trigger.get("dagster_run_id"), target, model.kind),
                     FIRST_STEPS["rpo_breach"].format(target=target), since, details)


def _archive_rpo_condition(policy: Policy, model: Recoverability, archive: ContinuousArchive, state: ArchiveState,
                           rpo: timedelta, now: datetime) -> Condition | None:
    """The RPO of a target with a continuous archive: the age of its newest recoverable point (of its newest stored
    change while the source has written more: the stream or the archiving is down or behind), any gap or unreadable
    part of the archive (a restore cannot pass it), and a base backup the archive does not reach."""
    target = model.target
    link = f"{policy.dagster.base_url.rstrip('/')}/assets/{'/'.join(archive.asset(target).key)}"
    steps, details, noun = archive.first_steps(target, state), state.details, archive.noun
    stored_at = state.newest_stored_at

    def breach(what: str, since: datetime | None = None) -> Condition:
        return Condition(f"rpo:{target}", "rpo_breach", target, what, link, steps, since, details)

    if stored_at is None:
        return breach(f"{target}: no {noun} is stored (RPO {_hours(rpo)})")
    if model.unrecoverable:
        return breach(f"{target}: {model.unrecoverable}")
    if model.point is None:
        return breach(f"{target}: {model.summary}")
    if model.rpo_breached:  # unknown (the source unreachable) counts as behind
        return breach(f"{target}: the newest stored {noun} is {_hours(now - stored_at)} old while the server "
                      f"{'is ' + str(state.behind) + ' bytes ahead' if state.behind else 'cannot be asked'}"
                      f", past the RPO of {_hours(rpo)}", model.point.at + rpo)
    return None


def check_conditions(policy: Policy, repo: Repository, keyring: Keyring) -> list[Condition]:
    """Failed ERROR checks of each target's newest checked backup (integrity: a failed verification), a
    check record that is refused (forged, or about another version of its manifest), and every check record
    rolled back."""
    conditions = []
    for target, config in sorted(policy.targets.items()):
        known = known_records(policy, repo, keyring, target)
        conditions += check_rollback_conditions(policy, repo, keyring, target, known)
        status = next((s for m in newest_first(repo, keyring, target)
                       if (s := check_status(repo, keyring, m, known)).status != "rolled_back"
                       and (s.record or s.problem)), None)
        if status is None:
            continue
        if status.problem is not None or status.record is None:
            conditions.append(_untrusted(policy, target, f"{target}: {status.problem}"))
            continue
        record = status.record
        for outcome in record.outcomes:
            if outcome.passed or outcome.severity != ERROR:
                continue
            event = "verification_failed" if outcome.name == "integrity" else "check_failed"
            first = FIRST_STEPS.get(outcome.name, FIRST_STEPS[event])
            conditions.append(Condition(
                f"check:{target}:{outcome.name}", event, target,
                f"{target}: {outcome.name} check failed for backup {record.backup_id}",
                run_link(policy, record.trigger.get("dagster_run_id"), target, config.kind),
                first.format(target=target, backup_id=record.backup_id), record.checked_at,
                {"backup": record.backup_id, "finding": outcome.description,
                 **({"object": outcome.failing_object} if outcome.failing_object else {})}))
    return conditions


def check_rollback_conditions(policy: Policy, repo: Repository, keyring: Keyring, target: str,
                              known: KnownRecords) -> list[Condition]:
    """A check record of the target rolled back (or deleted) against what its witnesses know, one per backup;
    and a sealed record state that is refused."""
    conditions = [_untrusted(policy, target, f"{target}: {p}") for p in known.problems if "refused" in p]
    for manifest in list_backups(repo, keyring, target)[0]:
        if manifest.backup_id not in known.checks:
            continue  # nothing known of it: nothing to roll back
        status = check_status(repo, keyring, manifest, known)
        if status.status == "rolled_back":
            conditions.append(_rolled_back(policy, target, f"rolled_back:{manifest.backup_id}", str(status.problem),
                                           f"verify it again (`regal-backup verify {manifest.backup_id}`)",
                                           manifest.backup_id))
    return conditions


def _rolled_back(policy: Policy, target: str, key: str, problem: str, resolve: str, backup: str) -> Condition:
    return Condition(key, "record_rolled_back", target, f"{target}: {problem}",
                     f"{policy.dagster.base_url.rstrip('/')}/assets",
                     FIRST_STEPS["record_rolled_back"].format(target=target, resolve=resolve), None, {"backup": backup})


def restore_test_conditions(policy: Policy, repo: Repository, keyring: Keyring) -> list[Condition]:
    """The newest restore test of each target, when it failed validation or missed the RTO (or its record is
    refused, or the newest one its witnesses know is gone: rolled back)."""
    conditions = []
    for target, config in sorted(policy.targets.items()):
        results = sorted(o.key for o in repo.list(restore_test_prefix(target)) if o.key.endswith(".json"))
        known = known_records(policy, repo, keyring, target)
        if rolled_back := known.restore_test_rollback(results):
            conditions.append(_rolled_back(policy, target, f"rolled_back:{target}:restore_test", rolled_back,
                                           f"run a restore test (`regal-backup restore-test --target {target}`)",
                                           str(known.restore_test.key if known.restore_test else "")))
            continue
        if not results:
            continue
        try:
            result = read_document(repo, keyring, RESTORE_TEST_KIND, results[-1])
        except IntegrityError as exc:
            conditions.append(_untrusted(policy, target, exc.message))
            continue
        if result["validation_passed"] and result["rto_within_target"]:
            continue
        finding = "; ".join(result["problems"]) or (f"RTO {result['rto_seconds']:.0f}s over the target of "
                                                     f"{result['rto_target_seconds']:.0f}s")
        conditions.append(Condition(
            f"restore_test:{target}", "restore_test_failed", target,
            f"{target}: restore test of backup {result['backup_id']} failed",
            run_link(policy, result.get("trigger", {}).get("dagster_run_id"), target, config.kind),
            FIRST_STEPS["restore_test_failed"].format(target=target),
            datetime.fromisoformat(result["tested_at"]), {"backup": result["backup_id"], "finding": finding}))
    return conditions


def damaged_conditions(policy: Policy, repo: Repository, keyring: Keyring) -> list[Condition]:
    """A backup directory no reader trusts: a manifest refused, or a completed backup whose manifest is gone
    (prune leaves these alone: they are evidence)."""
    conditions = []
    for damaged in list_backups(repo, keyring, completed=completed_backups(policy, repo))[1]:
        conditions.append(Condition(
            f"damaged:{damaged.backup_id}", "damaged_backup", damaged.target,
            f"{damaged.target}: backup {damaged.backup_id} cannot be trusted: {damaged.problem}",
            f"{policy.dagster.base_url.rstrip('/')}/assets", FIRST_STEPS["damaged_backup"],
            started_of(damaged.backup_id),
            {"backup": damaged.backup_id, "stored_bytes": damaged.stored_bytes}))
    return conditions


def _untrusted(policy: Policy, target: str, what: str) -> Condition:
    return Condition(f"untrusted:{target}", "document_refused", target, what,
                     f"{policy.dagster.base_url.rstrip('/')}/assets", FIRST_STEPS["damaged_backup"])


def capacity_conditions(policy: Policy, repo: Repository, keyring: Keyring | None = None,
                        now: datetime | None = None, found: CapacityForecast | None = None) -> list[Condition]:
    """Low room now (a local disk below min_free_fraction, an S3 quota above max_used_fraction), or, given the
    keys (the manifests' sizes and dates), full sooner than min_days_until_full at the growth of the forecast
    window (engine/capacity.py): one condition, `capacity`."""
    capacity = policy.alerts.capacity
    link = f"{policy.dagster.base_url.rstrip('/')}/assets"
    first = FIRST_STEPS["capacity"]
    if found is None and keyring is not None and now is not None:
        found = forecast(policy, repo, keyring, now)
    details = found.to_json() if found else {}
    if (space := repo.free_bytes()) is not None:
        free, total = space
        if total and free / total < capacity.min_free_fraction:
            return [Condition("capacity", "capacity", "repository",
                              f"repository disk {free / total:.0%} free, below {capacity.min_free_fraction:.0%}",
                              link, first, details={"free_bytes": free, "total_bytes": total,
                                                    "repository": repo.location, **details})]
    elif capacity.s3_quota_bytes:
        used = repo.usage_bytes()
        if used / capacity.s3_quota_bytes > capacity.max_used_fraction:
            return [Condition("capacity", "capacity", "repository",
                              f"repository uses {used / capacity.s3_quota_bytes:.0%} of its quota, above "
                              f"{capacity.max_used_fraction:.0%}", link, first,
                              details={"used_bytes": used, "quota_bytes": capacity.s3_quota_bytes,
                                       "repository": repo.location, **details})]
    days, bound = (found.days_until_full if found else None), capacity.min_days_until_full
    if found is not None and days is not None and bound is not None and days < bound:
        return [Condition("capacity", "capacity", "repository",
                          f"repository forecast to be full in {days:.1f} days (under {bound:g}) at "
                          f"{found.growth_bytes_per_day / 1e6:.1f} MB a day, the growth of the last "
                          f"{found.window_days:.0f} days", link, first, details={"repository": repo.location,
                                                                                 **details})]
    return []


def _hours(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 3600:
        return f"{seconds // 60} min" if seconds >= 60 else f"{seconds} s"
    return f"{seconds / 3600:.1f} h"
