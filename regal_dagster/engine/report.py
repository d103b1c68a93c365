"""The compliance report: a PDF an auditor reads on its own, every figure traceable to evidence.

`build_report(policy, period)` gathers the evidence of a period (a month `2026-11` or a quarter
`2026-Q4`; a future one is refused, the current one is marked interim): the audit trail's events (the
source of every count and rate), the chain's verification, the prune logs the trail vouches for
(retention at the period's end), the key inventory, the connections' encryption as configured, the
policy. It judges each control on that evidence alone, derives the frameworks' verdicts (a framework
passes only when every control mapped to it passes) and one list of exceptions (each failed or untested
control, with its owner, action and due date from the policy). It renders the HTML templates in
`reports/` (shipped as the package `regal_dagster.reports`) with WeasyPrint (fetching nothing but those templates' own files) into a PDF/A-3b with the
evidence attached (`evidence.json`, whose SHA-256 is on the cover, and one CSV per table) and the
results as OSCAL Assessment Results JSON, stores both in the repository (`compliance-reports/<period>/`)
with their SHA-256 beside them, and records the generation in the audit trail. Every string from the
outside world goes through the template engine's escaping.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib.resources import files
from itertools import pairwise
from pathlib import Path
from typing import Any

from . import oscal
from .audit import AuditEvent, AuditTrail, ChainVerdict, record, verify_trail
from .catalog import list_backups
from .charts import human_seconds, line_chart
from .crypto import Keyring, load_keyring
from .documents import unseal
from .errors import RegalError, UsageError
from .keys import key_inventory
from .layout import PRUNE_LOGS, report_key, report_oscal_key, target_of
from .policy import Policy
from .retention import PRUNE_LOG_KIND, prune_report
from .settings import CronExpression
from .storage import Repository, open_repository


def _template_directory() -> Path:
    """The templates' directory, the package `regal_dagster.reports`: the repository's top-level `reports/`
    in an editable install, `site-packages/regal_dagster/reports/` from the wheel."""
    directory = files("regal_dagster.reports")
    return directory.resolve() if isinstance(directory, Path) else Path(str(directory))


TEMPLATES = _template_directory()
PASS, FAIL, NOT_TESTED = "PASS", "FAIL", "NOT TESTED"
RESULTS = (PASS, FAIL, NOT_TESTED)
FRAMEWORKS = {"PCI": "PCI DSS 4.0.1", "SOX": "SOX ITGC", "GDPR": "GDPR"}  # first word of a mapping -> name
EVIDENCE_FILE = "evidence.json"
OSCAL_FILE = "assessment-results.json"


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
    "retention_at_end": ["target", "backup_id", "keep", "reasons", "delete_after", "prune_log"],
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
    ],
    "policy": ["setting", "value"],
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
    before = _event_rows(
        [e for e in trail_events if e.at < period.start and e.outcome == "success"], ("backup",)
    )
    evidence.tables["backups_before_period"] = [
        {"target": target, "seq": last["seq"], "at": last["at"], "resource": last["resource"]}
        for target in sorted(policy.targets)
        if (last := next((r for r in reversed(before) if r["target"] == target), None))
    ]
    keyring = load_keyring(policy)
    manifests = [m for target in sorted(policy.targets) for m in list_backups(repo, keyring, target)[0]]
    evidence.tables["keys"] = [
        k
        for k in key_inventory(policy, repo, keyring, manifests=manifests)
        if not k.get("created_at") or datetime.fromisoformat(k["created_at"]) < at
    ]
    logs, decisions = _prune_evidence(repo, keyring, trail_events, period, at)
    evidence.tables["prune_logs"], evidence.tables["retention_at_end"] = logs, decisions
    evidence.tables["transport"] = [t.to_json() for t in policy.transports()]
    evidence.tables["audit_chain"] = [verdict.to_json()]
    evidence.tables["policy"] = [{"setting": k, "value": v} for k, v in _policy_facts(policy).items()]
    return evidence


def _prune_evidence(
    repo: Repository, keyring: Keyring, trail_events: list[AuditEvent], period: Period, at: datetime
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The prune logs of the period, each authenticated (its seal) and checked against the SHA-256 its
    audit event recorded, and every decision of the last one: what retention kept at the period's end, and
    until when. A log the trail records but the repository lacks is listed too."""
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
        {"target": target, "backup_id": d.backup_id, "keep": d.keep, "reasons": "; ".join(d.reasons),
         "delete_after": d.delete_after.isoformat() if d.delete_after else None, "prune_log": last[0]}
        for target, ds in sorted(last[1].decisions.items()) for d in ds]
    return logs, decisions


def started_of_log(key: str) -> datetime | None:
    """When the prune that wrote the log at `key` ran (its name is its UTC time)."""
    try:
        return datetime.strptime(key.removeprefix(PRUNE_LOGS).removesuffix(".json"),
                                 "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def _policy_facts(policy: Policy) -> dict[str, Any]:
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
            }
            for name, t in sorted(policy.targets.items())
        },
    }


def _redacted_location(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//", url)


# --- figures -----------------------------------------------------------------------------------------


def _at(row: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(row["at"])


def figures(policy: Policy, evidence: Evidence, period: Period, now: datetime) -> dict[str, Any]:
    t = evidence.tables
    backups_ok = [r for r in t["backups"] if r["outcome"] == "success"]
    tests_ok = [r for r in t["restore_tests"] if r["outcome"] == "success"]
    end = period.judged_at(now)
    before = {r["target"]: _at(r) for r in t["backups_before_period"]}
    rpo_by_target: dict[str, float | None] = {}
    for target in sorted(policy.targets):
        times = sorted(_at(r) for r in backups_ok if r["target"] == target)
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
    }


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
            if row["outcome"] != "failure":
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


# --- controls --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ControlSpec:
    control_id: str
    mapping: tuple[str, ...]  # "PCI DSS 3.5.1", "SOX ITGC CO-1", "GDPR Art. 32(1)(b)"
    description: str
    frequency: str
    test: str
    evidence: str  # the evidence tables
    action: str  # what the owner does when it fails
    untested_action: str  # what the owner does when there was nothing to test it on


@dataclass
class Control:
    control_id: str
    mapping: list[str]
    description: str
    frequency: str
    test: str
    result: str
    finding: str
    evidence: str

    @property
    def frameworks(self) -> set[str]:
        return {m.split(" ")[0] for m in self.mapping}


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
    def at(self) -> datetime:
        return self.period.judged_at(self.now)

    def open_failures(self, control_id: str) -> list[dict[str, Any]]:
        return [f for f in self.failures if f["open"] and f["control_id"] == control_id]


def _backups_run(f: Facts) -> Judgement:
    targets = sorted(f.policy.targets)
    backed = {r["target"] for r in f.t["backups"] if r["outcome"] == "success"}
    missing = [t for t in targets if t not in backed]
    open_failures = f.open_failures("BK-01")
    return Judgement(
        not missing and not open_failures,
        f"{f.figures['backups_succeeded']} of {f.figures['backups_total']} backups succeeded; "
        f"targets without a good backup in the period: {', '.join(missing) or 'none'}; "
        f"unresolved failures: {len(open_failures)}",
    )


def _rpo_met(f: Facts) -> Judgement:
    achieved = f.figures["rpo_achieved_seconds"]
    missing = [k for k, v in achieved.items() if v is None]
    late = [k for k, v in achieved.items() if v is not None and v > f.policy.rpo_for(k).total_seconds()]
    return Judgement(
        not missing and not late,
        f"worst gap between good backups {human_seconds(f.figures['rpo_worst_seconds'])} against an RPO "
        f"of {human_seconds(f.figures['rpo_target_seconds'])}; over the RPO: {', '.join(late) or 'none'}"
        + (f"; never backed up: {', '.join(missing)}" if missing else ""),
    )


def _verified(f: Facts) -> Judgement:
    verified = {r["resource"] for r in f.t["verifications"] if r["outcome"] == "success"}
    good = [r["resource"] for r in f.t["backups"] if r["outcome"] == "success"]
    unverified = [b for b in good if b not in verified]
    return Judgement(
        None if not good else not unverified,
        f"{len(good) - len(unverified)} of {len(good)} good backups verified"
        + (
            f"; not verified: {', '.join(unverified[:5])}" + (" …" if len(unverified) > 5 else "")
            if unverified
            else ""
        ),
    )


def _encrypted_at_rest(f: Facts) -> Judgement:
    failures = [r for r in f.t["verifications"] if not (r.get("checks") or {}).get("encryption", True)]
    return Judgement(
        None if not f.t["verifications"] else not failures,
        f"{len(f.t['verifications'])} verifications; the encryption check failed {len(failures)} time(s)",
    )


def _encrypted_in_transit(f: Facts) -> Judgement:
    rows = f.t["transport"]
    exposed = [r["connection"] for r in rows if r["protection"] not in ("TLS", "local")]
    counts = {p: sum(r["protection"] == p for r in rows) for p in ("TLS", "local")}
    return Judgement(
        not exposed,
        f"{len(rows)} connection(s): {counts['TLS']} over TLS, {counts['local']} never "
        f"leave the host; not encrypted: {', '.join(exposed) or 'none'}",
    )


def _keys_rotated(f: Facts) -> Judgement:
    at = f.at
    primary = next(
        (
            k
            for k in f.t["keys"]
            if k.get("primary_since")
            and datetime.fromisoformat(k["primary_since"]) <= at
            and (not k.get("primary_until") or at < datetime.fromisoformat(k["primary_until"]))
        ),
        None,
    )
    if primary is None:
        return Judgement(
            None, "no key's primary dates cover the period's end (a keyset older than key dates)"
        )
    age = (at - datetime.fromisoformat(primary["primary_since"])).days
    operations = len(f.t["key_operations"])
    return Judgement(
        age <= f.policy.encryption.cryptoperiod.days,
        f"key {primary['key_id']} was primary at the period's end, {age} day(s) into its cryptoperiod "
        f"of {f.policy.encryption.cryptoperiod.days} days; {operations} key operation(s) in the period",
    )


def _retention_enforced(f: Facts) -> Judgement:
    logs, decisions = f.t["prune_logs"], f.t["retention_at_end"]
    existed = bool(f.t["backups_before_period"]) or any(r["outcome"] == "success" for r in f.t["backups"])
    problems = [f"prune log {r['key']}: {r['authenticated'].removeprefix('NO: ')}" for r in logs
                if r["authenticated"].startswith("NO")]
    problems += [f"{len(r['not_carried_out'])} deletion(s) planned at {r['at'][:16]} not carried out"
                 for r in logs if r["not_carried_out"]]
    good = [r for r in logs if not r["authenticated"].startswith("NO")]
    if not good:
        if not existed and not problems:
            return Judgement(None, "no prune ran in the period and there were no backups")
        return Judgement(False, "; ".join(["no prune ran in the period"
                                           + ("; backups existed, so retention was not enforced" if existed
                                              else ""), *problems]))
    last = _at(good[-1])
    interval = prune_interval(f.policy.prune.cron, f.at)
    if f.at - last > interval + timedelta(hours=1):
        problems.append(f"the last prune ran {human_seconds((f.at - last).total_seconds())} before the "
                        f"period's end (the schedule runs every {human_seconds(interval.total_seconds())})")
    overdue = [d["backup_id"] for d in decisions if d["keep"] and d["delete_after"]
               and datetime.fromisoformat(d["delete_after"]) < f.at - interval - timedelta(hours=1)]
    if overdue:
        problems.append(f"{len(overdue)} backup(s) kept past their planned deletion")
    kept = sum(d["keep"] for d in decisions)
    return Judgement(not problems, f"{len(good)} prune(s) in the period; the last, at {last:%Y-%m-%d %H:%M}, "
                                   f"kept {kept} backup(s) inside their retention and deleted {good[-1]['deleted']}"
                                   + ("; " + "; ".join(problems) if problems else ""))


def prune_interval(cron: str, before: datetime) -> timedelta:
    """The longest gap between the prune schedule's runs in the 8 days before `before` (a minute's
    resolution), so that a prune is expected within it."""
    expression = CronExpression.parse(cron)
    minute = before.replace(second=0, microsecond=0)
    ticks = [
        minute - timedelta(minutes=i)
        for i in range(8 * 24 * 60)
        if expression.matches(minute - timedelta(minutes=i))
    ]
    return max((a - b for a, b in pairwise(ticks)), default=timedelta(days=8))


def _offsite(f: Facts) -> Judgement:
    results = [(r.get("checks") or {}).get("offsite_copy") for r in f.t["verifications"]]
    lock = f.policy.repository.object_lock
    configured = f.policy.offsite is not None
    return Judgement(
        configured and all(v is not False for v in results),
        ("off-site copy " + ("configured" if configured else "NOT configured"))
        + f"; Object Lock {lock.mode if lock else 'off'}; off-site check failures: "
        f"{sum(v is False for v in results)}",
    )


def _restore_tested(f: Facts) -> Judgement:
    tests = f.t["restore_tests"]
    slow = [
        r
        for r in tests
        if r.get("rto_seconds") is not None
        and r.get("rto_target_seconds")
        and r["rto_seconds"] > r["rto_target_seconds"]
    ]
    open_failures = f.open_failures("RT-01")
    return Judgement(
        None if not tests else not open_failures and not slow,
        f"{f.figures['restore_tests_passed']} of {f.figures['restore_tests_total']} restore tests passed; "
        f"worst RTO {human_seconds(f.figures['rto_worst_seconds'])} against "
        f"{human_seconds(f.figures['rto_target_seconds'])}; unresolved failures: {len(open_failures)}",
    )


def _drilled(f: Facts) -> Judgement:
    drills = f.t["drills_last_quarter"]
    if not drills:
        return Judgement(None, "no drill in the 92 days before the period's end")
    last = drills[-1]
    return Judgement(
        last["outcome"] == "success",
        f"{len(drills)} drill(s); the last, {last['at'][:10]}: {last['outcome']}, RTO "
        f"{human_seconds(last.get('rto_seconds'))}, RPO "
        + (
            human_seconds(last["rpo_seconds"])
            if last.get("rpo_seconds") is not None
            else "none (a target "
            "was not recovered: "
            + ", ".join(t for t, ok in (last.get("targets") or {}).items() if not ok)
            + ")"
        ),
    )


def _events_complete(f: Facts) -> Judgement:
    rows = f.t["audit_events"]
    incomplete = [
        r
        for r in rows
        if not all(r[k] for k in ("actor", "event_type", "outcome", "host", "process", "resource", "at"))
    ]
    return Judgement(
        None if not rows else not incomplete, f"{len(rows)} events; incomplete: {len(incomplete)}"
    )


def _chain_intact(f: Facts) -> Judgement:
    v = f.verdict
    return Judgement(
        v.ok,
        f"chain of {v.entries} entries intact; {v.checkpoints} checkpoint(s) match"
        if v.ok
        else f"CHAIN BROKEN at entry {v.first_bad_seq}: {v.problem}",
    )


def _audit_kept(f: Facts) -> Judgement:
    months = f.policy.audit.retention_months if f.policy.audit else 0
    oldest = f.verdict.oldest
    return Judgement(
        months >= 12,
        f"retention {months} months; oldest entry {oldest.strftime('%Y-%m-%d') if oldest else 'none'}",
    )


def _alerted(f: Facts) -> Judgement:
    channels = f.policy.alerts.channels
    sent = [r for r in f.t["alerts"] if r["outcome"] == "success"]

    def about(alert: dict[str, Any]) -> str:
        """The target an alert was about (events before alerts named it: the second part of its key)."""
        if alert["target"] in f.policy.targets:
            return str(alert["target"])
        parts = str(alert["resource"]).split(":")
        return parts[1] if len(parts) > 1 else ""

    def alerted(failure: dict[str, Any]) -> bool:
        return any(
            _at(a) >= _at(failure)
            and (failure["target"] not in f.policy.targets or about(a) == failure["target"])
            for a in sent
        )

    open_failures = [fl for fl in f.failures if fl["open"]]
    unalerted = sorted({fl["target"] for fl in open_failures if not alerted(fl)})
    return Judgement(
        bool(channels) and not unalerted,
        f"{len(channels)} alert channel(s); {len(f.failures)} failed operation(s) in the period, "
        f"{len(open_failures)} unresolved; {len(sent)} alert(s) delivered; unresolved failures with no "
        f"alert about them: {', '.join(unalerted) or 'none'}",
    )


def _erasures_hold(f: Facts) -> Judgement:
    tests = f.t["restore_tests"]
    leftovers = [r for r in tests if any(((r.get("erasures") or {}).get("still_present") or {}).values())]
    return Judgement(
        None if not tests and not f.t["erasures"] else not leftovers,
        f"{len(f.t['erasures'])} erasure request(s); {len(tests)} restore test(s), "
        f"{len(leftovers)} with erased subjects present",
    )


CONTROLS: list[tuple[ControlSpec, Callable[[Facts], Judgement]]] = [
    (ControlSpec(
        "BK-01", ("SOX ITGC CO-1", "PCI DSS 12.10.1"),
        "Backups of every target run on schedule and succeed; failures are resolved.",
        "hourly, daily, weekly, monthly (policy schedules, UTC)",
        "Counted backup events per target; every target needs a good backup in the period and every failure "
        "a later success.", "backups",
        "Fix the cause of each unresolved failure, run a backup of every target named, and confirm it "
        "verifies.",
        "Restore the backup schedule: no backup ran in the period."), _backups_run),
    (ControlSpec(
        "BK-02", ("SOX ITGC CO-1", "GDPR Art. 32(1)(c)"),
        "The recovery point objective is met: no gap between good backups longer than the RPO.",
        "continuous (rpo_watch sensor)",
        "Longest gap between consecutive good backups of each target, from the last one before the period to "
        "the period's end.", "backups, backups_before_period",
        "Find why backups stopped for the targets named (schedules, sensor, failures) and restore the "
        "cadence; consider a shorter schedule.", "Run backups: there is no RPO without them."), _rpo_met),
    (ControlSpec(
        "VR-01", ("SOX ITGC CO-2", "GDPR Art. 32(1)(d)"),
        "Every backup is verified automatically: every byte read back, authenticated and checksummed.",
        "after every backup; daily", "Matched each good backup to a successful verification event.",
        "backups, verifications",
        "Run `regal-backup verify` on each backup named and investigate any that fails.",
        "Nothing to verify: no good backup in the period (see BK-01)."), _verified),
    (ControlSpec(
        "EN-01", ("PCI DSS 3.5.1", "GDPR Art. 32(1)(a)"),
        "Backups are encrypted at rest with AES-256 (Tink AES256-GCM-HKDF streaming AEAD) under keys "
        "protected by a master key.", "every backup",
        "The encryption check of every verification: our format, a known key, no plaintext in samples of the "
        "stored bytes, server-side encryption on S3.", "verifications, policy",
        "Quarantine the backups whose encryption check failed, find how plaintext reached the repository, "
        "and take new backups.", "Verify the period's backups (see VR-01)."), _encrypted_at_rest),
    (ControlSpec(
        "EN-02", ("PCI DSS 4.2.1", "GDPR Art. 32(1)(a)"),
        "Connections that carry backup data or keys leave the host only encrypted (TLS).",
        "every connection, as configured",
        "Read each connection's settings in the policy: a DSN's sslmode (require or stricter), the S3 and "
        "Redis URL schemes. Connections on this host (Unix socket, loopback) do not leave it.", "transport",
        "Set sslmode=verify-full on the DSNs named, and https:// or rediss:// on the endpoints named.", "-"),
     _encrypted_in_transit),
    (ControlSpec(
        "KM-01", ("PCI DSS 3.7.4",),
        "Encryption keys are changed at the end of their cryptoperiod; old keys are retired once no backup "
        "needs them.", "cryptoperiod (policy)",
        "Age of the key that was primary at the period's end against the cryptoperiod; rotations and "
        "retirements listed.", "keys, key_operations",
        "Run `regal-backup keys rotate`, then retire the old key once retention has pruned its backups.",
        "Record key dates: rotate the key once so the keyset carries them."), _keys_rotated),
    (ControlSpec(
        "RD-01", ("PCI DSS 3.2.1", "GDPR Art. 5(1)(e)"),
        "Backups are kept only as long as the retention policy says, and then deleted for good.",
        "prune daily (policy); proof quarterly",
        "Retention at the period's end: the period's prune logs (each vouched for by the audit trail), every "
        "deletion they planned carried out, the last one within the prune schedule, no backup kept past its "
        "planned deletion.", "prune_logs, retention_at_end, deletions",
        "Run `regal-backup prune`, check the prune schedule runs, and investigate logs the trail does not "
        "vouch for.", "Nothing to prune: no backup existed in the period."), _retention_enforced),
    (ControlSpec(
        "MD-01", ("PCI DSS 9.4.1", "GDPR Art. 32(1)(c)"),
        "Backup copies are kept off-site and immutable: a second repository, S3 Object Lock where "
        "configured.",
        "every backup", "Off-site repository configured; the offsite_copy check of every verification.",
        "verifications, policy",
        "Configure `offsite:` in the policy and run `regal-backup offsite sync`.", "-"),
     _offsite),
    (ControlSpec(
        "RT-01", ("SOX ITGC CO-3", "GDPR Art. 32(1)(c)", "GDPR Art. 32(1)(d)"),
        "Backups are restore-tested (new backups and a monthly random sample) and restore within the RTO.",
        "each new backup; monthly",
        "Restore test events: row counts and content hashes, schema objects, amcheck validated; RTO measured "
        "against the objective.", "restore_tests, restores",
        "Investigate each failed or slow restore test and re-run `regal-backup restore-test` until it "
        "passes.",
        "Run `regal-backup restore-test`: no restore test ran in the period."), _restore_tested),
    (ControlSpec(
        "DR-01", ("PCI DSS 12.10.2", "GDPR Art. 32(1)(c)"),
        "A full disaster-recovery drill each quarter rebuilds every target from the repository and measures "
        "RTO and RPO.", "quarterly",
        "Drill events in the 92 days before the period's end; the last must pass.", "drills_last_quarter",
        "Fix what the drill found and run `regal-backup drill` again.",
        "Run `regal-backup drill`: no drill in the last quarter."), _drilled),
    (ControlSpec(
        "AU-01", ("PCI DSS 10.2.1", "PCI DSS 10.2.2", "GDPR Art. 30"),
        "Every backup, verification, restore test, restore, deletion, key operation, policy change, report "
        "and alert is an audit event with who, what, when, outcome, where from and the resource.",
        "every operation", "Checked every event of the period for the PCI DSS 10.2.2 fields.", "audit_events",
        "Find the writer of the incomplete events and fix it.",
        "No event in the period: check that operations run and are recorded."), _events_complete),
    (ControlSpec(
        "AU-02", ("PCI DSS 10.3.2", "GDPR Art. 5(1)(f)"),
        "The audit trail is append-only and tamper-evident: a hash chain, UPDATE/DELETE refused by the "
        "database, the head checkpointed into the repository.", "every report; on demand",
        "Recomputed the whole chain and compared it with the checkpoints.", "audit_chain",
        "Treat as a security incident: find who changed the trail (`regal-backup audit verify` names the "
        "entry).", "-"), _chain_intact),
    (ControlSpec(
        "AU-03", ("PCI DSS 10.5.1",), "Audit entries are kept at least 12 months.", "continuous",
        "Policy retention setting; deletion is refused by the database; oldest entry.", "audit_chain, policy",
        "Set audit.retention_months to 12 or more.", "-"), _audit_kept),
    (ControlSpec(
        "AL-01", ("PCI DSS 10.7.2",),
        "Failures of critical controls (backups, verification, restore tests, drills, key operations, "
        "prunes) are detected and alerted.", "continuous (sensors)",
        "Alert channels configured; for every unresolved failed operation of the period, an alert about its "
        "target delivered after it.", "alerts, audit_events",
        "Configure an alert channel and check the alert sensors are running.", "-"), _alerted),
    (ControlSpec(
        "GD-01", ("GDPR Art. 17", "GDPR Art. 30"),
        "Erasure requests are recorded and re-applied after every restore, so restored backups do not bring "
        "erased subjects back.", "every restore and restore test",
        "Erasure events; erasures re-applied in each restore test; subjects still present.",
        "erasures, restore_tests",
        "Re-apply the erasures at the restored copies named and find why they were missed.",
        "Run a restore test: it proves the erasures are re-applied."), _erasures_hold),
]


def evaluate_controls(facts: Facts) -> list[Control]:
    return [
        Control(
            spec.control_id,
            list(spec.mapping),
            spec.description,
            spec.frequency,
            spec.test,
            (j := judge(facts)).result,
            j.finding,
            spec.evidence,
        )
        for spec, judge in CONTROLS
    ]


def framework_verdict(results: Iterable[str]) -> str:
    """A framework passes only when every control mapped to it passes: any FAIL fails it; otherwise any
    NOT TESTED (or no control at all) leaves it NOT TESTED."""
    results = list(results)
    if FAIL in results:
        return FAIL
    if not results or NOT_TESTED in results:
        return NOT_TESTED
    return PASS


def framework_verdicts(controls: list[Control]) -> dict[str, str]:
    return {
        name: framework_verdict(c.result for c in controls if prefix in c.frameworks)
        for prefix, name in FRAMEWORKS.items()
    }


def exceptions(
    policy: Policy, controls: list[Control], period: Period, now: datetime
) -> list[dict[str, Any]]:
    """The one list of exceptions: every control that did not pass, with its owner, action and due date."""
    specs = {spec.control_id: spec for spec, _ in CONTROLS}
    due = (period.judged_at(now) + timedelta(days=policy.reports.remediation_days)).date().isoformat()
    found: list[dict[str, Any]] = []
    for c in controls:
        if c.result == PASS:
            continue
        spec = specs[c.control_id]
        found.append(
            {
                "number": len(found) + 1,
                "control_id": c.control_id,
                "result": c.result,
                "finding": c.finding,
                "owner": policy.reports.owner_of(c.control_id),
                "action": spec.action if c.result == FAIL else spec.untested_action,
                "due": due,
            }
        )
    return found


# --- charts --------------------------------------------------------------------------------------------


def charts(policy: Policy, evidence: Evidence, period: Period, now: datetime) -> dict[str, str]:
    t = evidence.tables
    start, end = period.start, period.judged_at(now)
    ok = [r for r in t["backups"] if r["outcome"] == "success"]

    def per_target(
        rows: list[dict[str, Any]], value: Callable[[dict[str, Any]], float | None]
    ) -> dict[str, list[tuple[datetime, float]]]:
        series: dict[str, list[tuple[datetime, float]]] = {}
        for r in rows:
            if (v := value(r)) is not None:
                series.setdefault(r["target"], []).append((_at(r), float(v)))
        return series

    before = {r["target"]: _at(r) for r in t["backups_before_period"]}
    gaps: dict[str, list[tuple[datetime, float]]] = {}
    for target in sorted(policy.targets):
        times = sorted(_at(r) for r in ok if r["target"] == target)
        times = [before[target], *times] if target in before else times
        if times:
            gaps[target] = [(b, (b - a).total_seconds()) for a, b in pairwise(times)]
    return {
        "size": line_chart(
            per_target(ok, lambda r: r.get("bytes_stored")),
            "Backup size (stored, compressed and encrypted)",
            "size",
            start,
            end,
        ),
        "duration": line_chart(
            per_target(ok, lambda r: r.get("seconds")), "Backup duration", "duration", start, end
        ),
        "rpo": line_chart(
            {k: v for k, v in gaps.items() if v},
            "Time between good backups (achieved RPO)",
            "duration",
            start,
            end,
            target=policy.rpo.total_seconds(),
            target_label="RPO objective",
        ),
        "rto": line_chart(
            per_target(t["restore_tests"], lambda r: r.get("rto_seconds")),
            "Restore tests: time to restore (RTO)",
            "duration",
            start,
            end,
            target=policy.rto.total_seconds(),
            target_label="RTO objective",
        ),
    }


# --- rendering -----------------------------------------------------------------------------------------


def _fetcher():
    """WeasyPrint fetches only the templates' own files: anything else (http, other paths) is refused."""
    from weasyprint import URLFetcher

    class LocalTemplatesOnly(URLFetcher):
        def __init__(self) -> None:
            super().__init__()
            self.refused: list[str] = []

        def fetch(self, url, headers=None):
            if url.startswith("file://"):
                path = Path(url.removeprefix("file://").split("?")[0]).resolve()
                if TEMPLATES.resolve() in path.parents:
                    return super().fetch(url, headers)
            self.refused.append(url)
            raise ValueError(f"the report renderer fetches only its own template files, not {url[:80]}")

    return LocalTemplatesOnly()


def _breakable(value: Any, shortest: int = 18) -> Any:
    """Text whose tokens of `shortest` characters or more (identifiers, paths, DSNs) may wrap after their
    separators (- _ / : . ,); words, dates and shorter tokens stay whole. Text between backticks is a
    command, set in code type."""
    from markupsafe import Markup, escape

    def token(text: str) -> Markup:
        if len(text) < shortest:
            return escape(text)
        return Markup("<wbr>").join(escape(part) for part in re.split(r"(?<=[-_/:.,])", text))

    def words(text: str) -> Markup:
        return Markup("").join(token(part) for part in re.split(r"(\s+)", text))

    parts = str(value).split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: plain text
        return words(str(value))
    return Markup("").join(words(part) if i % 2 == 0 else Markup("<code>") + words(part) + Markup("</code>")
                           for i, part in enumerate(parts))


def _when(value: Any) -> str:
    """A timestamp for a table: UTC to the minute."""
    if value in (None, ""):
        return ""
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M}"


def _words(value: Any) -> str:
    """An identifier as words (policy_change -> policy change)."""
    return str(value).replace("_", " ")


def _counts(value: dict[str, Any] | None) -> str:
    """Per-table counts for people: `public.customers 2, public.orders 1`, or `none`."""
    items = [f"{k} {v}" for k, v in (value or {}).items() if v]
    return ", ".join(items) or "none"


def render_pdf(context: dict[str, Any], attachments: dict[str, bytes]) -> tuple[bytes, list[str]]:
    """The PDF (PDF/A-3b, attachments embedded) and the URLs the renderer refused to fetch."""
    import jinja2
    from weasyprint import HTML, Attachment

    if not (TEMPLATES / "compliance_report.html").is_file():
        raise RegalError(f"the report templates are missing from {TEMPLATES}",
                         "reinstall regal-backup from its wheel or the source tree (not from a zip archive)")
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined
    )
    environment.filters.update(
        duration=human_seconds, breakable=_breakable, when=_when, words=_words, counts=_counts
    )
    html = environment.get_template("compliance_report.html").render(**context)
    fetcher = _fetcher()
    described = {
        EVIDENCE_FILE: "all evidence as JSON (its SHA-256 is on the cover)",
        OSCAL_FILE: "the results as OSCAL Assessment Results",
    }
    files = [
        Attachment(
            string=body,
            name=name,
            relationship="Data",
            description=described.get(name, f"evidence: {name.removesuffix('.csv')}"),
        )
        for name, body in attachments.items()
    ]
    pdf = HTML(string=html, base_url=TEMPLATES.as_uri() + "/", url_fetcher=fetcher).write_pdf(
        pdf_variant="pdf/a-3b", attachments=files, custom_metadata=True
    )
    return pdf, list(fetcher.refused)


def sign_pdf(policy: Policy, pdf: bytes, report_id: str) -> bytes:
    """A PAdES signature over the whole PDF (an incremental update: the PDF/A content stays as it is)."""
    import os

    from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
    from pyhanko.sign import signers

    signing = policy.reports.signing
    assert signing is not None
    passphrase = os.environ.get(signing.passphrase_env, "").encode() if signing.passphrase_env else None
    try:
        signer = signers.SimpleSigner.load(
            str(policy.resolve_path(signing.key_file)),
            str(policy.resolve_path(signing.cert_file)),
            ca_chain_files=[str(policy.resolve_path(f)) for f in signing.chain_files],
            key_passphrase=passphrase,
        )
    except (OSError, ValueError) as exc:
        raise RegalError(
            f"the report signing key or certificate cannot be loaded ({type(exc).__name__})",
            "check reports.signing: the files, and the passphrase variable",
        ) from None
    if signer is None:
        raise RegalError(
            "the report signing key or certificate cannot be loaded",
            "check reports.signing: the files, and the passphrase variable",
        )
    out = signers.sign_pdf(
        IncrementalPdfFileWriter(io.BytesIO(pdf)),
        signers.PdfSignatureMetadata(
            field_name="RegalBackupReport", reason="compliance report", name=report_id, md_algorithm="sha256"
        ),
        signer=signer,
    )
    return out.getvalue()


@dataclass
class ReportResult:
    report_id: str
    period: str
    key: str  # repository key of the PDF
    sha256: str
    pdf: bytes
    evidence_sha256: str
    chain_ok: bool
    controls: list[Control]
    figures: dict[str, Any]
    refused_urls: list[str]
    frameworks: dict[str, str] = field(default_factory=dict)
    exceptions: list[dict[str, Any]] = field(default_factory=list)
    interim: bool = False
    oscal_key: str = ""  # repository key of the OSCAL Assessment Results
    oscal: bytes = b""


def assessment_results(
    report_id: str,
    period: Period,
    now: datetime,
    interim: bool,
    evidence_sha256: str,
    frameworks: dict[str, str],
    controls: list[Control],
    found: list[dict[str, Any]],
) -> bytes:
    by_control = {e["control_id"]: e for e in found}
    document = oscal.assessment_results(
        report_id=report_id,
        period=period.label,
        start=period.start,
        end=period.judged_at(now),
        generated_at=now,
        interim=interim,
        evidence_sha256=evidence_sha256,
        evidence_name=EVIDENCE_FILE,
        frameworks=frameworks,
        controls=[
            oscal.AssessedControl(
                c.control_id,
                c.description,
                c.test,
                c.finding,
                c.result,
                tuple(c.mapping),
                c.evidence,
                by_control.get(c.control_id),
            )
            for c in controls
        ],
    )
    return oscal.to_bytes(document)


def build_report(
    policy: Policy,
    period: Period,
    *,
    repo: Repository | None = None,
    trigger: dict[str, str] | None = None,
    now: datetime | None = None,
) -> ReportResult:
    now = now or datetime.now(UTC)
    period.refuse_future(now)
    repo = repo or open_repository(policy)
    trail = AuditTrail(policy, repo)
    trail.ensure_schema()
    trail_events = trail.events()  # read once: verified whole, then the period's share is the evidence
    verdict = verify_trail(trail, trail_events)
    trail.checkpoint(verdict)
    evidence = collect_evidence(policy, repo, trail_events, period, verdict, now)
    figs = figures(policy, evidence, period, now)
    failures = operational_failures(evidence)
    matrix = evaluate_controls(Facts(policy, evidence, figs, failures, verdict, period, now))
    frameworks = framework_verdicts(matrix)
    found = exceptions(policy, matrix, period, now)
    interim = period.interim(now)
    report_id = f"{period.label}-{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    evidence_json = evidence.json_bytes()
    evidence_sha = hashlib.sha256(evidence_json).hexdigest()
    csvs = {f"{name}.csv": evidence.csv(name).encode() for name in evidence.tables}
    results = assessment_results(report_id, period, now, interim, evidence_sha, frameworks, matrix, found)
    context = {
        "report_id": report_id,
        "period": period,
        "generated_at": now,
        "judged_at": period.judged_at(now),
        "interim": interim,
        "evidence_sha256": evidence_sha,
        "verdict": verdict,
        "policy": policy,
        "facts": _policy_facts(policy),
        "figures": figs,
        "frameworks": frameworks,
        "controls": matrix,
        "exceptions": found,
        "failures": failures,
        "evidence": evidence,
        "charts": charts(policy, evidence, period, now),
        "attachments": {
            name: (hashlib.sha256(body).hexdigest(), len(evidence.tables[name.removesuffix(".csv")]))
            for name, body in csvs.items()
        },
        "oscal_file": OSCAL_FILE,
        "oscal_sha256": hashlib.sha256(results).hexdigest(),
        "evidence_file": EVIDENCE_FILE,
        "PASS": PASS,
        "FAIL": FAIL,
        "NOT_TESTED": NOT_TESTED,
    }
    pdf, refused = render_pdf(context, {EVIDENCE_FILE: evidence_json, OSCAL_FILE: results, **csvs})
    if policy.reports.signing is not None:
        pdf = sign_pdf(policy, pdf, report_id)
    digest = hashlib.sha256(pdf).hexdigest()
    key, results_key = report_key(period.label, report_id), report_oscal_key(period.label, report_id)
    repo.put_bytes(results_key, results)
    repo.put_bytes(key, pdf)
    repo.put_bytes(
        key + ".sha256",
        f"{digest}  {key.rsplit('/', 1)[1]}\n{hashlib.sha256(results).hexdigest()}  "
        f"{results_key.rsplit('/', 1)[1]}\n".encode(),
    )
    record(
        policy,
        repo,
        "report_generated",
        key,
        "success",
        {
            "period": period.label,
            "interim": interim,
            "sha256": digest,
            "evidence_sha256": evidence_sha,
            "oscal": results_key,
            "chain_ok": verdict.ok,
            "frameworks": frameworks,
            "exceptions": len(found),
        },
        trigger,
    )
    return ReportResult(
        report_id,
        period.label,
        key,
        digest,
        pdf,
        evidence_sha,
        verdict.ok,
        matrix,
        figs,
        refused,
        frameworks,
        found,
        interim,
        results_key,
        results,
    )
