"""The evidence of a period: the audit trail's events (the source of every count and rate), the chain's
verification, the prune logs the trail vouches for (retention at the period's end), the key inventory, the
connections' encryption as configured and the policy, as tables of rows; the figures drawn from them, and
the period's failed operations with what resolved each."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

from ..audit import AuditEvent, ChainVerdict
from ..audit_db import shared_reads
from ..catalog import list_backups
from ..crypto import Keyring, load_keyring
from ..documents import unseal
from ..errors import RegalError, UsageError
from ..holds import EVENTS as HOLD_EVENTS
from ..keys import key_inventory
from ..layout import PRUNE_LOGS, target_of
from ..policy import Policy
from ..recoverability import target_recoverability
from ..retention import PRUNE_LOG_KIND, prune_report, retention_verdict
from ..storage import Repository
from .charts import human_seconds
from .operation import Operation, coverage, operation_of, schedule_adherence, tier_rows

# --- the period --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Period:
    label: str
    start: datetime
    end: datetime  # exclusive

    @classmethod
    def parse(cls, text: str) -> Period:
        if m := re.fullmatch(r"(\d{4})-(\d{2})", text):
            year, month = int(m[1]), int(m[2])
            if 1 <= month <= 12:
                start = datetime(year, month, 1, tzinfo=UTC)
                end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
                return cls(text, start, end)
        if m := re.fullmatch(r"(\d{4})-Q([1-4])", text):
            year, quarter = int(m[1]), int(m[2])
            start = datetime(year, 3 * quarter - 2, 1, tzinfo=UTC)
            end = datetime(year + quarter // 4, (3 * quarter) % 12 + 1, 1, tzinfo=UTC)
            return cls(text, start, end)
        raise UsageError(f"'{text}' is not a report period", "give a month (2026-11) or a quarter (2026-Q4)")

    @classmethod
    def previous_month(cls, now: datetime) -> Period:
        last = now.replace(day=1) - timedelta(days=1)
        return cls.parse(f"{last:%Y-%m}")

    @classmethod
    def quarter_of(cls, when: datetime) -> Period:
        return cls.parse(f"{when.year}-Q{(when.month - 1) // 3 + 1}")

    def interim(self, now: datetime) -> bool:
        """The period has not ended: its report covers only the part up to `now`."""
        return now < self.end

    def judged_at(self, now: datetime) -> datetime:
        """The moment the controls are judged at: the period's end, or now for the current period."""
        return min(self.end, now)

    def refuse_future(self, now: datetime) -> None:
        if self.start > now:
            raise UsageError(f"the period {self.label} has not begun (it starts {self.start:%Y-%m-%d}): "
                             "there is no evidence to report on yet", "give the current or a past period")


# --- evidence ----------------------------------------------------------------------------------------

EVENT_COLUMNS = ["seq", "at", "actor", "outcome", "resource", "target", "run_id", "hash"]
EVENT_TABLES = {
    "backups": ("backup",),
    "verifications": ("verification",),
    "restore_tests": ("restore_test",),
    "drills": ("dr_drill",),
    "deletions": ("backup_deleted",),
    "key_operations": ("key_rotate", "key_retire"),
    "erasures": ("gdpr_erasure",),
    "alerts": ("alert",),
    "restores": ("restore",),
    "prunes": ("prune",),
    "policy_changes": ("policy_change",),
}
COLUMNS: dict[str, list[str]] = {  # every table's columns, so that an empty CSV still has its header row
    "audit_events": [
        "seq",
        "at",
        "actor",
        "event_type",
        "outcome",
        "host",
        "process",
        "run_id",
        "resource",
        "details",
        "prev_hash",
        "hash",
    ],
    **{name: EVENT_COLUMNS for name in EVENT_TABLES},
    "drills_last_quarter": EVENT_COLUMNS,
    "backups_before_period": ["target", "seq", "at", "resource"],
    "keys": [
        "key_id",
        "status",
        "primary",
        "created_at",
        "primary_since",
        "primary_until",
        "retired_at",
        "cryptoperiod_days",
        "backups",
        "gdpr_ledger",
    ],
    "prune_logs": ["key", "at", "sha256", "authenticated", "kept", "deleted", "not_carried_out"],
    "retention_at_end": ["target", "backup_id", "keep", "retention", "deletion_at", "reasons", "delete_after",
                         "prune_log"],
    "transport": ["connection", "protection", "how"],
    "audit_chain": [
        "ok",
        "entries",
        "head_seq",
        "head_hash",
        "first_bad_seq",
        "problem",
        "oldest",
        "checkpoints",
        "spooled",
        "resumed_from_seq",
        "resumed_from_at",
    ],
    "policy": ["setting", "value"],
    "recoverability": ["target", "kind", "at", "summary", "point_backup", "point_position", "point_at", "age_seconds",
                       "rpo_seconds", "rpo_breached", "unrecoverable", "checks_passed", "checked_at",
                       "archive_check_passed", "unreadable", "restore_test_passed", "restore_tested_at"],
    "operation": ["in_operation_since", "policy_since"],
    "schedule_adherence": ["target", "scheduled", "met", "missed", "first_missed"],
    "coverage": ["day", "state", "without_backup"],
    "refusals": ["seq", "at", "kind", "target", "resource", "what"],
    "repositories": ["role", "location", "failure_domain", "immutability", "same_domain_as_primary"],
    "signoffs": ["seq", "at", "actor", "result_id", "result_type", "result_resource", "by", "role", "note"],
    "tiers": ["target", "tier", "backup_every_seconds", "rpo_seconds", "rto_seconds", "longest_interval_seconds",
              "rpo_achieved_seconds", "restore_tests", "worst_rto_seconds"],
    "legal_holds": ["target", "backup_id", "hold", "reason", "pinned_at", "until", "lifted_at", "annotation"],
}


@dataclass
class Evidence:
    """The rows behind every figure, by table name; attached to the PDF as `evidence.json` (its SHA-256 on
    the cover) and one CSV per table."""

    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def json_bytes(self) -> bytes:
        """The attached evidence.json, byte for byte."""
        return (
            json.dumps(self.tables, indent=1, sort_keys=True, default=str, ensure_ascii=False) + "\n"
        ).encode()

    def sha256(self) -> str:
        """`sha256sum evidence.json` of the attached file."""
        return hashlib.sha256(self.json_bytes()).hexdigest()

    def csv(self, name: str) -> str:
        rows = self.tables[name]
        known = COLUMNS.get(name, [])
        columns = list(dict.fromkeys([*known, *(k for row in rows for k in row)])) or ["(empty)"]
        out = io.StringIO()
        writer = csv.DictWriter(out, columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    k: json.dumps(v, default=str, sort_keys=True) if isinstance(v, dict | list) else v
                    for k, v in row.items()
                }
            )
        return out.getvalue()


def _event_rows(events: Iterable[AuditEvent], event_types: tuple[str, ...]) -> list[dict[str, Any]]:
    rows = []
    for e in events:
        if e.event_type not in event_types:
            continue
        details = json.loads(e.details)
        rows.append(
            {
                "seq": e.seq,
                "at": e.at.isoformat(),
                "actor": e.actor,
                "outcome": e.outcome,
                "resource": e.resource,
                "target": str(details.get("target") or target_of(e.resource)),
                "run_id": e.run_id or "",
                "hash": e.hash,
                "event_type": e.event_type,
                **{k: v for k, v in details.items() if k not in ("target", "resource")},
            }
        )
    return rows


def _target_of_event(e: AuditEvent) -> str:
    """The target an event is about, as `_event_rows` names it (its details' `target`, else its resource's)."""
    if '"target"' in e.details:
        return str(json.loads(e.details).get("target") or target_of(e.resource))
    return target_of(e.resource)


def collect_evidence(
    policy: Policy,
    repo: Repository,
    trail_events: list[AuditEvent],
    period: Period,
    verdict: ChainVerdict,
    now: datetime,
) -> Evidence:
    at = period.judged_at(now)
    events = [e for e in trail_events if period.start <= e.at < at]
    evidence = Evidence()
    evidence.tables["audit_events"] = [
        {
            "seq": e.seq,
            "at": e.at.isoformat(),
            "actor": e.actor,
            "event_type": e.event_type,
            "outcome": e.outcome,
            "host": e.host,
            "process": e.process,
            "run_id": e.run_id or "",
            "resource": e.resource,
            "details": e.details,
            "prev_hash": e.prev_hash,
            "hash": e.hash,
        }
        for e in events
    ]
    for name, event_types in EVENT_TABLES.items():
        evidence.tables[name] = _event_rows(events, event_types)
    for row in evidence.tables["backups"]:  # a backup that failed before it started has no class yet
        row.setdefault("retention_class", None)
    # A drill that covers the period may have run in the quarter before it ends.
    evidence.tables["drills_last_quarter"] = _event_rows(
        [e for e in trail_events if at - timedelta(days=92) <= e.at < at], ("dr_drill",)
    )
    last_before: dict[str, dict[str, Any]] = {}  # each target's last successful backup before the period
    for e in reversed(trail_events):
        if e.at < period.start and e.event_type == "backup" and e.outcome == "success":
            target = _target_of_event(e)
            if target in policy.targets and target not in last_before:
                last_before[target] = {"target": target, "seq": e.seq, "at": e.at.isoformat(), "resource": e.resource}
                if len(last_before) == len(policy.targets):
                    break
    evidence.tables["backups_before_period"] = [last_before[t] for t in sorted(last_before)]
    keyring = load_keyring(policy)
    manifests = [m for target in sorted(policy.targets) for m in list_backups(repo, keyring, target)[0]]
    evidence.tables["keys"] = [
        k
        for k in key_inventory(policy, repo, keyring, manifests=manifests)
        if not k.get("created_at") or datetime.fromisoformat(k["created_at"]) < at
    ]
    logs, decisions = _prune_evidence(repo, keyring, trail_events, period, at, policy.prune.cron)
    evidence.tables["prune_logs"], evidence.tables["retention_at_end"] = logs, decisions
    evidence.tables["transport"] = [t.to_json() for t in policy.transports()]
    evidence.tables["audit_chain"] = [verdict.to_json()]
    evidence.tables["policy"] = [{"setting": k, "value": v} for k, v in policy_facts(policy).items()]
    # A sign-off comes after its result, perhaps after the period: every one recorded up to the report counts.
    evidence.tables["signoffs"] = [
        {"seq": e.seq, "at": e.at.isoformat(), "actor": e.actor, **json.loads(e.details)}
        for e in trail_events if e.event_type == "signoff" and e.outcome == "success" and e.at < now]
    derive_tables(policy, evidence, operation_of(trail_events), period, at)
    evidence.tables["recoverability"] = recoverability_rows(policy, repo, keyring, now)
    evidence.tables["legal_holds"] = legal_holds(trail_events, period, at)
    return evidence


def derive_tables(policy: Policy, evidence: Evidence, operation: Operation, period: Period, at: datetime) -> None:
    """The tables judged from the event tables and the policy: when the system went into operation, schedule
    adherence, each day's coverage, the refusals that protected data, the repositories' facts."""
    evidence.tables["operation"] = [operation.to_json()]
    from_ = None if operation.since is None else max(period.start, operation.since)
    evidence.tables["schedule_adherence"] = schedule_adherence(policy, evidence.tables["backups"], from_, at)
    evidence.tables["coverage"] = coverage(policy, evidence.tables["backups"], period.start, at, operation.since)
    evidence.tables["refusals"] = refusals(evidence)
    evidence.tables["repositories"] = repository_facts(policy)
    evidence.tables["tiers"] = tier_rows(policy, evidence.tables["backups"], evidence.tables["backups_before_period"],
                                         evidence.tables["restore_tests"], at)


def repository_facts(policy: Policy) -> list[dict[str, Any]]:
    """Each repository: where, what one failure takes down with it (its failure domain), whether its objects
    are immutable (S3 Object Lock COMPLIANCE or GOVERNANCE mode, or not at all), and whether the off-site
    copy shares the primary's failure domain."""
    primary = policy.repository.failure_domain(policy.base_dir)
    rows = []
    for role, config in (("primary", policy.repository), ("off-site", policy.offsite)):
        if config is None:
            continue
        domain = primary if role == "primary" else config.failure_domain(policy.base_dir)
        rows.append({"role": role, "location": _redacted_location(config.url), "failure_domain": domain,
                     "immutability": config.object_lock.mode if config.object_lock else "none",
                     "same_domain_as_primary": role != "primary" and domain == primary})
    return rows


def recoverability_rows(policy: Policy, repo: Repository, keyring: Keyring, now: datetime) -> list[dict[str, Any]]:
    """Per target, what it can be recovered to when the report is generated: the recoverability model
    (engine/recoverability.py) as `status` says it: the newest recoverable point, its evidence (the point's checks,
    the newest check of a continuous archive, the newest restore test), its age against the RPO, and what makes
    points unrecoverable (naming the segment)."""
    rows = []
    with shared_reads(policy.audit.resolved_dsn()) if policy.audit else contextlib.nullcontext():
        models = [target_recoverability(policy, repo, keyring, target, now) for target in sorted(policy.targets)]
    for target, model in zip(sorted(policy.targets), models, strict=True):
        point, checks = model.point, model.point_checks or {}
        archive, tested = model.archive_check or {}, model.restore_test or {}
        rows.append({
            "target": target, "kind": model.kind, "at": now.isoformat(), "summary": model.summary,
            "point_backup": point.backup_id if point else None, "point_position": point.position if point else None,
            "point_at": point.at.isoformat() if point else None,
            "age_seconds": None if model.age_seconds is None else round(model.age_seconds, 3),
            "rpo_seconds": model.rpo_seconds, "rpo_breached": model.rpo_breached, "unrecoverable": model.unrecoverable,
            "checks_passed": checks.get("passed"), "checked_at": checks.get("checked_at"),
            "archive_check_passed": archive.get("passed"), "unreadable": archive.get("unreadable"),
            "restore_test_passed": tested.get("passed"), "restore_tested_at": tested.get("tested_at")})
    return rows


def legal_holds(trail_events: list[AuditEvent], period: Period, at: datetime) -> list[dict[str, Any]]:
    """Every backup under a legal hold during the period (`pin`), or annotated (`annotate`) by its end, as the
    audit trail's events built them (the holds document is checked against the same events: engine/holds.py).
    `hold`: in force at the period's end, lifted (`unpin`) or expired (its `--until`) in it; null: annotated only."""
    rows: dict[str, dict[str, Any]] = {}
    for e in trail_events:
        if e.event_type not in HOLD_EVENTS or e.outcome != "success" or e.at >= at:
            continue
        details = json.loads(e.details)
        row = rows.setdefault(e.resource, {"target": target_of(e.resource), "backup_id": e.resource, "hold": None,
                                           "reason": None, "pinned_at": None, "until": None, "lifted_at": None,
                                           "annotation": None})
        if e.event_type == "backup_pinned":
            row.update(reason=details.get("reason"), pinned_at=details.get("pinned_at") or e.at.isoformat(),
                       until=details.get("until"), lifted_at=None)
        elif e.event_type == "backup_unpinned":
            row["lifted_at"] = e.at.isoformat()
        else:
            row["annotation"] = details.get("text") or None
    found = []
    for row in rows.values():
        if row["pinned_at"] is not None:
            ended = [datetime.fromisoformat(t) for t in (row["lifted_at"], row["until"]) if t]
            end = min(ended) if ended else None
            if end is not None and end < period.start:  # over before the period: not a hold of this period
                row.update(hold=None, reason=None, pinned_at=None, until=None, lifted_at=None)
            else:
                row["hold"] = ("in force" if end is None or end >= at else
                               "lifted" if row["lifted_at"] and datetime.fromisoformat(row["lifted_at"]) == end
                               else "expired")
        if row["hold"] or row["annotation"]:
            found.append(row)
    return sorted(found, key=lambda r: (r["target"], r["backup_id"]))


def _prune_evidence(
    repo: Repository, keyring: Keyring, trail_events: list[AuditEvent], period: Period, at: datetime, prune_cron: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The prune logs of the period, each authenticated (its seal) and checked against the SHA-256 its
    audit event recorded, and every decision of the last one: what retention kept at the period's end, and
    until when (`retention_verdict`: the same retention `list` showed then). A log the trail records but the
    repository lacks is listed too."""
    recorded = {
        d["log"]: d.get("log_sha256")
        for e in trail_events
        if e.event_type == "prune" and "log" in (d := json.loads(e.details))
    }
    stored = {s.key for s in repo.list(PRUNE_LOGS)}
    logs, last = [], None
    for key in sorted(stored | set(recorded)):
        when = started_of_log(key)
        if when is None or not period.start <= when < at:
            continue
        row: dict[str, Any] = {"key": key, "at": when.isoformat(), "sha256": None, "kept": None,
                               "deleted": None, "not_carried_out": []}
        if key not in stored:
            logs.append({**row, "authenticated": "NO: the audit trail records this log, the repository lacks it"})
            continue
        body = repo.get_bytes(key)
        row["sha256"] = hashlib.sha256(body).hexdigest()
        try:
            log = prune_report(unseal(keyring, PRUNE_LOG_KIND, key, body))
        except RegalError as exc:
            logs.append({**row, "authenticated": f"NO: {exc.message}"})
            continue
        if log.dry_run:
            continue
        if key not in recorded or recorded[key] is None:
            authenticated = "sealed (its prune predates logs recorded in the audit trail)"
        elif recorded[key] == row["sha256"]:
            authenticated = "sealed, and recorded in the audit trail"
        else:
            authenticated = "NO: differs from the SHA-256 the audit trail recorded"
        deleted = set(log.deleted)
        logs.append({**row, "authenticated": authenticated,
                     "kept": sum(d.keep for ds in log.decisions.values() for d in ds), "deleted": len(deleted),
                     "not_carried_out": sorted({d.backup_id for ds in log.decisions.values() for d in ds
                                                if not d.keep} - deleted)})
        last = (key, log)
    decisions = [] if last is None else [
        {"target": target, "backup_id": d.backup_id, "keep": d.keep, "retention": verdict.summary,
         "deletion_at": verdict.deletion_at.isoformat() if verdict.deletion_at else None,
         "reasons": "; ".join(d.reasons), "delete_after": d.delete_after.isoformat() if d.delete_after else None,
         "prune_log": last[0]}
        for target, ds in sorted(last[1].decisions.items()) for d in ds
        if (verdict := retention_verdict(d, prune_cron, last[1].at))]
    return logs, decisions


def started_of_log(key: str) -> datetime | None:
    """When the prune that wrote the log at `key` ran (its name is its UTC time)."""
    try:
        return datetime.strptime(key.removeprefix(PRUNE_LOGS).removesuffix(".json"),
                                 "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def policy_facts(policy: Policy) -> dict[str, Any]:
    return {
        "policy_sha256": policy.source_sha256,
        "rpo": human_seconds(policy.rpo.total_seconds()),
        "rto": human_seconds(policy.rto.total_seconds()),
        "retention": policy.retention.model_dump(),
        "repository": _redacted_location(policy.repository.url),
        "object_lock": policy.repository.object_lock.mode if policy.repository.object_lock else None,
        "offsite": _redacted_location(policy.offsite.url) if policy.offsite else None,
        "encryption": "Tink streaming AEAD AES256_GCM_HKDF_1MB per object; keyset encrypted by a master key "
        + ("in AWS KMS" if policy.encryption.master_key.kms_key_uri else "(AES256-GCM)"),
        "server_side_encryption": policy.repository.store_encryption(),
        "cryptoperiod_days": policy.encryption.cryptoperiod.days,
        "alert_channels": [c.kind for c in policy.alerts.channels],
        "audit_retention_months": policy.audit.retention_months if policy.audit else None,
        "prune_cron": policy.prune.cron,
        "remediation_days": policy.reports.remediation_days,
        "targets": {
            name: {
                "kind": t.kind,
                "description": t.description,
                "data_classes": t.data_classes,
                "rpo": human_seconds(policy.rpo_for(name).total_seconds()),
                "rto": human_seconds(policy.rto_for(name).total_seconds()),
                "tier": t.tier,
            }
            for name, t in sorted(policy.targets.items())
        },
    }


def _redacted_location(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//", url)


# --- figures -----------------------------------------------------------------------------------------


def row_at(row: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(row["at"])


def figures(policy: Policy, evidence: Evidence, period: Period, now: datetime) -> dict[str, Any]:
    t = evidence.tables
    backups_ok = [r for r in t["backups"] if r["outcome"] == "success"]
    tests_ok = [r for r in t["restore_tests"] if r["outcome"] == "success"]
    end = period.judged_at(now)
    before = {r["target"]: row_at(r) for r in t["backups_before_period"]}
    rpo_by_target: dict[str, float | None] = {}
    by_target: dict[str, list[datetime]] = {}
    for r in backups_ok:
        by_target.setdefault(r["target"], []).append(row_at(r))
    for target in sorted(policy.targets):
        times = sorted(by_target.get(target, []))
        if target in before:
            times.insert(0, before[target])
        if not times:
            rpo_by_target[target] = None  # never backed up by the period's end
            continue
        gaps = [(b - a).total_seconds() for a, b in pairwise(times)] + [(end - times[-1]).total_seconds()]
        rpo_by_target[target] = max(gaps)
    rto_values = [r["rto_seconds"] for r in t["restore_tests"] if r.get("rto_seconds") is not None]
    drill_rto = [r["rto_seconds"] for r in t["drills"] if r.get("rto_seconds") is not None]
    return {
        "backups_total": len(t["backups"]),
        "backups_succeeded": len(backups_ok),
        "backup_success_rate": len(backups_ok) / len(t["backups"]) if t["backups"] else None,
        "restore_tests_total": len(t["restore_tests"]),
        "restore_tests_passed": len(tests_ok),
        "rpo_achieved_seconds": rpo_by_target,
        "rpo_worst_seconds": max((v for v in rpo_by_target.values() if v is not None), default=None),
        "rpo_target_seconds": policy.rpo.total_seconds(),
        "rto_worst_seconds": max(rto_values + drill_rto, default=None),
        "rto_target_seconds": policy.rto.total_seconds(),
        "deletions": len(t["deletions"]),
        "erasures": len(t["erasures"]),
        "alerts": len(t["alerts"]),
        "audit_events": len(t["audit_events"]),
        "in_operation_since": t["operation"][0]["in_operation_since"] if t.get("operation") else None,
        "days": {state: sum(d["state"] == state for d in t.get("coverage", []))
                 for state in ("not in operation", "covered", "gap")},
        "scheduled_backups": sum(r["scheduled"] for r in t.get("schedule_adherence", [])),
        "scheduled_backups_met": sum(r["met"] for r in t.get("schedule_adherence", [])),
        "refusals": len(t.get("refusals", [])),
    }


def refusals(evidence: Evidence) -> list[dict[str, Any]]:
    """Operations refused to protect data (a key still in use, a restore into a database holding data):
    recorded, and not failed operations."""
    return sorted(({"seq": r["seq"], "at": r["at"], "kind": operation, "target": r["target"],
                    "resource": r["resource"], "what": r.get("error") or "refused"}
                   for name, (operation, _) in FAILURE_TABLES.items() for r in evidence.tables[name]
                   if r["outcome"] == "failure" and r.get("refused")), key=lambda r: r["seq"])


# --- operational failures ------------------------------------------------------------------------------

FAILURE_TABLES = {  # evidence table -> (the operation, the control its failures count against)
    "backups": ("backup", "BK-01"),
    "verifications": ("verification", "VR-01"),
    "restore_tests": ("restore test", "RT-01"),
    "drills": ("drill", "DR-01"),
    "key_operations": ("key operation", "KM-01"),
    "restores": ("restore", "RT-01"),
    "prunes": ("prune", "RD-01"),
}


def operational_failures(evidence: Evidence) -> list[dict[str, Any]]:
    """Every failed operation of the period (backups, verifications, restore tests, drills, key operations,
    restores, prunes), with what resolved it: a later success of the same kind and target. Retention checks
    and reports are not operations that can fail this way, and are not counted."""
    found = []
    for name, (operation, control_id) in FAILURE_TABLES.items():
        rows = evidence.tables[name]
        for row in rows:
            if row["outcome"] != "failure" or row.get("refused"):
                continue
            later = next(
                (
                    r
                    for r in rows
                    if r["seq"] > row["seq"] and r["outcome"] == "success" and r["target"] == row["target"]
                ),
                None,
            )
            lost = [target for target, recovered in (row.get("targets") or {}).items() if not recovered]
            what = (
                row.get("error")
                or "; ".join(row.get("failed", []) or row.get("problems", []))
                or (f"not recovered: {', '.join(lost)}" if lost else "")
                or "failed"
            )
            found.append(
                {
                    "seq": row["seq"],
                    "at": row["at"],
                    "kind": operation,
                    "control_id": control_id,
                    "target": row["target"],
                    "resource": row["resource"],
                    "what": what,
                    "resolved_by": later and {"seq": later["seq"], "at": later["at"]},
                    "open": later is None,
                }
            )
    return sorted(found, key=lambda f: f["seq"])
