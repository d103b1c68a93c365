"""The compliance report: a PDF an auditor reads on its own, every figure traceable to evidence.

`build_report(policy, period)` gathers the evidence of a period (a month `2026-11` or a quarter
`2026-Q4`): the audit trail's events (the source of every count and rate), the chain's verification,
the key inventory, what retention keeps now, the policy. It evaluates the control matrix, renders the
HTML templates in `reports/` (shipped as the package `regal_dagster.reports`) with WeasyPrint (fetching
nothing but those templates' own files) into a PDF/A-3b with the evidence attached as CSV and JSON,
stores it in the repository as `compliance-reports/<period>/<report id>.pdf` with its SHA-256 beside it,
and records the generation in the audit trail. Every string from the outside world goes through the
template engine's escaping.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib.resources import files
from itertools import pairwise
from pathlib import Path
from typing import Any

from .audit import AuditEvent, AuditTrail, ChainVerdict, record, verify_trail
from .catalog import list_backups
from .crypto import load_keyring
from .errors import RegalError
from .keys import key_inventory
from .layout import report_key, target_of
from .policy import Policy
from .retention import run_prune
from .storage import Repository, backend_for, open_repository


def _template_directory() -> Path:
    """The templates' directory, the package `regal_dagster.reports`: the repository's top-level `reports/`
    in an editable install, `site-packages/regal_dagster/reports/` from the wheel."""
    directory = files("regal_dagster.reports")
    return directory.resolve() if isinstance(directory, Path) else Path(str(directory))


TEMPLATES = _template_directory()
PASS, FAIL, NOT_TESTED = "PASS", "FAIL", "NOT TESTED"


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
        raise RegalError(f"'{text}' is not a report period", "give a month (2026-11) or a quarter (2026-Q4)")

    @classmethod
    def previous_month(cls, now: datetime) -> Period:
        last = now.replace(day=1) - timedelta(days=1)
        return cls.parse(f"{last:%Y-%m}")

    @classmethod
    def quarter_of(cls, when: datetime) -> Period:
        return cls.parse(f"{when.year}-Q{(when.month - 1) // 3 + 1}")


# --- evidence ----------------------------------------------------------------------------------------

@dataclass
class Evidence:
    """The rows behind every figure, by table name; attached to the PDF and hashed for the cover."""

    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.tables, sort_keys=True, separators=(",", ":"), default=str,
                                         ensure_ascii=False).encode()).hexdigest()

    def csv(self, name: str) -> str:
        rows = self.tables[name]
        out = io.StringIO()
        columns = list(dict.fromkeys(k for row in rows for k in row)) or ["(no rows)"]
        writer = csv.DictWriter(out, columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v, default=str) if isinstance(v, dict | list) else v for k, v in row.items()})
        return out.getvalue()


def _event_rows(events: list[AuditEvent], event_type: str) -> list[dict[str, Any]]:
    rows = []
    for e in events:
        if e.event_type != event_type:
            continue
        details = json.loads(e.details)
        rows.append({"seq": e.seq, "at": e.at.isoformat(), "actor": e.actor, "outcome": e.outcome,
                     "resource": e.resource, "target": str(details.get("target") or target_of(e.resource)), "run_id": e.run_id or "",
                     "hash": e.hash, **{k: v for k, v in details.items() if k not in ("target", "resource")}})
    return rows


def collect_evidence(policy: Policy, repo: Repository, trail_events: list[AuditEvent], period: Period,
                     verdict: ChainVerdict, now: datetime) -> Evidence:
    events = [e for e in trail_events if period.start <= e.at < period.end]
    evidence = Evidence()
    evidence.tables["audit_events"] = [
        {"seq": e.seq, "at": e.at.isoformat(), "actor": e.actor, "event_type": e.event_type, "outcome": e.outcome,
         "host": e.host, "process": e.process, "run_id": e.run_id or "", "resource": e.resource,
         "details": e.details, "prev_hash": e.prev_hash, "hash": e.hash} for e in events]
    for name, event_type in [("backups", "backup"), ("verifications", "verification"),
                             ("restore_tests", "restore_test"), ("drills", "dr_drill"),
                             ("deletions", "backup_deleted"), ("key_operations", "key_rotate"),
                             ("erasures", "gdpr_erasure"), ("alerts", "alert"), ("restores", "restore"),
                             ("prunes", "prune"), ("policy_changes", "policy_change")]:
        evidence.tables[name] = _event_rows(events, event_type)
    evidence.tables["key_operations"] += _event_rows(events, "key_retire")
    for row in evidence.tables["backups"]:  # a backup that failed before it started has no class yet
        row.setdefault("retention_class", None)
    # A drill that covers the period may have run in the quarter before it ends.
    evidence.tables["drills_last_quarter"] = _event_rows(
        [e for e in trail_events if period.end - timedelta(days=92) <= e.at < period.end], "dr_drill")
    keyring = load_keyring(policy)
    manifests = [m for target in sorted(policy.targets) for m in list_backups(repo, keyring, target)[0]]  # read once
    evidence.tables["keys"] = key_inventory(policy, repo, keyring, manifests=manifests)
    kept = run_prune(policy, repo, now, dry_run=True, keyring=keyring)  # what retention keeps now, and anything past it
    evidence.tables["retention_now"] = [
        {"target": target, "backup_id": d.backup_id, "keep": d.keep, "reasons": "; ".join(d.reasons)}
        for target, decisions in kept.decisions.items() for d in decisions]
    evidence.tables["kept_backups"] = [
        {"target": m.target, "backup_id": m.backup_id, "retention_class": m.retention_class,
         "started_at": m.started_at.isoformat(), "retain_until": m.retain_until.isoformat(),
         "locked_until": m.locked_until.isoformat() if m.locked_until else "", "stored_bytes": m.stored_bytes,
         "seconds": round(m.duration_seconds, 3), "key_ids": sorted({o.encryption.key_id for o in m.objects})}
        for m in manifests]
    evidence.tables["audit_chain"] = [verdict.to_json()]
    evidence.tables["policy"] = [{"setting": k, "value": v} for k, v in _policy_facts(policy).items()]
    return evidence


def _policy_facts(policy: Policy) -> dict[str, Any]:
    return {
        "policy_sha256": policy.source_sha256, "rpo": str(policy.rpo), "rto": str(policy.rto),
        "retention": policy.retention.model_dump(), "repository": _redacted_location(policy.repository.url),
        "object_lock": policy.repository.object_lock.mode if policy.repository.object_lock else None,
        "offsite": _redacted_location(policy.offsite.url) if policy.offsite else None,
        "encryption": "Tink streaming AEAD AES256_GCM_HKDF_1MB per object; keyset encrypted by a master key "
                      + ("in AWS KMS" if policy.encryption.master_key.kms_key_uri else "(AES256-GCM)"),
        "server_side_encryption": policy.repository.server_side_encryption
                                  if backend_for(policy.repository.url).encrypts_at_rest else None,
        "cryptoperiod_days": policy.encryption.cryptoperiod.days,
        "alert_channels": [c.kind for c in policy.alerts.channels],
        "audit_retention_months": policy.audit.retention_months if policy.audit else None,
        "targets": {name: {"kind": t.kind, "description": t.description, "data_classes": t.data_classes,
                           "rpo": str(policy.rpo_for(name)), "rto": str(policy.rto_for(name))}
                    for name, t in sorted(policy.targets.items())},
    }


def _redacted_location(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//", url)


# --- figures and controls ----------------------------------------------------------------------------

@dataclass
class Control:
    control_id: str
    mapping: list[str]  # "PCI DSS 3.5.1", "SOX ITGC CO", "GDPR Art. 32(1)(b)"
    description: str
    frequency: str
    test: str
    result: str
    finding: str
    evidence: str  # evidence table(s) and rows

    @property
    def frameworks(self) -> set[str]:
        return {m.split(" ")[0] for m in self.mapping}


def _seconds(value: Any) -> float | None:
    return None if value is None else float(value)


def figures(policy: Policy, evidence: Evidence, period: Period, now: datetime) -> dict[str, Any]:
    t = evidence.tables
    backups_ok = [r for r in t["backups"] if r["outcome"] == "success"]
    tests_ok = [r for r in t["restore_tests"] if r["outcome"] == "success"]
    rpo_by_target: dict[str, float | None] = {}
    end = min(period.end, now)
    for target in sorted(policy.targets):
        times = sorted(datetime.fromisoformat(r["at"]) for r in backups_ok if r["target"] == target)
        if not times:
            rpo_by_target[target] = None
            continue
        gaps = [(b - a).total_seconds() for a, b in pairwise(times)] + [(end - times[-1]).total_seconds()]
        rpo_by_target[target] = max(gaps)
    rto_values = [r["rto_seconds"] for r in t["restore_tests"] if r.get("rto_seconds") is not None]
    drill_rto = [r["rto_seconds"] for r in t["drills"]]
    return {
        "backups_total": len(t["backups"]), "backups_succeeded": len(backups_ok),
        "backup_success_rate": len(backups_ok) / len(t["backups"]) if t["backups"] else None,
        "restore_tests_total": len(t["restore_tests"]), "restore_tests_passed": len(tests_ok),
        "rpo_achieved_seconds": rpo_by_target,
        "rpo_worst_seconds": max((v for v in rpo_by_target.values() if v is not None), default=None),
        "rpo_target_seconds": policy.rpo.total_seconds(),
        "rto_worst_seconds": max(rto_values + drill_rto, default=None),
        "rto_target_seconds": policy.rto.total_seconds(),
        "deletions": len(t["deletions"]), "erasures": len(t["erasures"]), "alerts": len(t["alerts"]),
        "audit_events": len(t["audit_events"]),
    }


def exceptions(evidence: Evidence) -> list[dict[str, Any]]:
    """Every failure in the period, with what resolved it (a later success of the same kind and target)."""
    found = []
    for name in ("backups", "verifications", "restore_tests", "drills", "key_operations", "restores", "prunes"):
        rows = evidence.tables[name]
        for row in rows:
            if row["outcome"] != "failure":
                continue
            later = next((r for r in rows if r["seq"] > row["seq"] and r["outcome"] == "success"
                          and r["target"] == row["target"]), None)
            found.append({"seq": row["seq"], "at": row["at"], "kind": name, "resource": row["resource"],
                          "what": row.get("error") or "; ".join(row.get("failed", []) or row.get("problems", []))
                          or "failed",
                          "resolution": f"{name[:-1].replace('_', ' ')} succeeded at {later['at'][:19]} (entry "
                                        f"{later['seq']})" if later else "OPEN",
                          "open": later is None})
    return found


def controls(policy: Policy, evidence: Evidence, figs: dict[str, Any], verdict: ChainVerdict,
             open_exceptions: list[dict[str, Any]], now: datetime) -> list[Control]:
    t = evidence.tables
    result: list[Control] = []

    def add(control_id: str, mapping: list[str], description: str, frequency: str, test: str, passed: bool | None,
            finding: str, refs: str) -> None:
        result.append(Control(control_id, mapping, description, frequency, test,
                              NOT_TESTED if passed is None else PASS if passed else FAIL, finding, refs))

    targets = sorted(policy.targets)
    backed = {r["target"] for r in t["backups"] if r["outcome"] == "success"}
    open_backups = [e for e in open_exceptions if e["kind"] == "backups"]
    add("BK-01", ["SOX ITGC CO-1", "PCI DSS 12.10.1"], "Backups of every target run on schedule and succeed; "
        "failures are resolved.", "hourly, daily 02:00, weekly Sun 01:00, monthly (UTC)",
        "Counted backup events per target in the audit trail; every failure must be followed by a success.",
        None if not t["backups"] else not open_backups and set(targets) <= backed,
        f"{figs['backups_succeeded']} of {figs['backups_total']} backups succeeded; targets without a backup: "
        f"{', '.join(sorted(set(targets) - backed)) or 'none'}; open failures: {len(open_backups)}",
        f"backups ({len(t['backups'])} rows)")
    worst = figs["rpo_worst_seconds"]
    missing = [k for k, v in figs["rpo_achieved_seconds"].items() if v is None]
    add("BK-02", ["SOX ITGC CO-1", "GDPR Art. 32(1)(c)"], "The recovery point objective is met: no gap "
        "between good backups longer than the RPO.", "continuous (rpo_watch sensor)",
        "Longest gap between consecutive successful backups of each target, and from the last one to the end "
        "of the period.", None if not t["backups"] else not missing and worst is not None and all(
            v <= policy.rpo_for(k).total_seconds() for k, v in figs["rpo_achieved_seconds"].items() if v is not None),
        f"worst RPO achieved {_duration(worst)} against {_duration(figs['rpo_target_seconds'])}"
        + (f"; no backup for {', '.join(missing)}" if missing else ""), "backups")
    verified = {r["resource"] for r in t["verifications"] if r["outcome"] == "success"}
    unverified = [r["resource"] for r in t["backups"] if r["outcome"] == "success" and r["resource"] not in verified]
    add("VR-01", ["SOX ITGC CO-2", "GDPR Art. 32(1)(d)"], "Every backup is verified automatically: every byte "
        "read back, authenticated and checksummed.", "after every backup; daily",
        "Matched each successful backup to a successful verification event.",
        None if not t["backups"] else not unverified,
        f"{len(verified)} backups verified; not verified: {len(unverified)}", "backups, verifications")
    encryption_failures = [r for r in t["verifications"] if not r.get("checks", {}).get("encryption", True)]
    add("EN-01", ["PCI DSS 3.5.1", "GDPR Art. 32(1)(b)"], "Backups are encrypted at rest with AES-256 "
        "(Tink AES256-GCM-HKDF streaming AEAD) under keys protected by a master key; TLS in transit.",
        "every backup", "The encryption check of every verification: our format, a known key, no plaintext in "
        "samples of the stored bytes, server-side encryption on S3.",
        None if not t["verifications"] else not encryption_failures,
        f"{len(t['verifications'])} verifications; encryption check failed {len(encryption_failures)} times",
        "verifications, policy")
    primary = next((k for k in t["keys"] if k["primary"]), None)
    age_days = None
    if primary and primary.get("primary_since"):
        age_days = (now - datetime.fromisoformat(primary["primary_since"])).days
    add("KM-01", ["PCI DSS 3.7.4"], "Encryption keys are changed at the end of their cryptoperiod; old keys are "
        "retired once no backup needs them.", f"cryptoperiod {policy.encryption.cryptoperiod.days} days",
        "Compared the primary key's age with the cryptoperiod; listed rotations and retirements.",
        None if age_days is None else age_days <= policy.encryption.cryptoperiod.days,
        f"primary key {primary['key_id'] if primary else '?'} is {age_days} days old; "
        f"{len(t['key_operations'])} key operations in the period", "keys, key_operations")
    past = [r for r in t["retention_now"] if not r["keep"]]
    add("RD-01", ["PCI DSS 3.2.1", "GDPR Art. 5(1)(e)"], "Backups are kept only as long as the retention policy "
        "says, and then deleted for good.", f"prune daily ({policy.prune.cron}); proof quarterly",
        "Ran the retention planner against the repository now: nothing may be past its retention.", not past,
        f"{len(past)} backup(s) past retention; {len(t['deletions'])} deleted in the period",
        "retention_now, deletions")
    offsite_results = [r.get("checks", {}).get("offsite_copy") for r in t["verifications"]]
    offsite_ok = policy.offsite is not None and all(v is not False for v in offsite_results)
    add("MD-01", ["PCI DSS 9.4.1", "GDPR Art. 32(1)(c)"], "Backup copies are kept off-site and immutable: a "
        "second repository, S3 Object Lock where configured.", "every backup",
        "Off-site repository configured; offsite_copy check results of every verification.",
        offsite_ok, ("off-site copy " + ("configured" if policy.offsite else "NOT configured"))
        + f"; Object Lock {policy.repository.object_lock.mode if policy.repository.object_lock else 'off'}; "
        f"off-site check failures: {sum(v is False for v in offsite_results)}", "verifications, policy")
    tests = t["restore_tests"]
    add("RT-01", ["SOX ITGC CO-3", "GDPR Art. 32(1)(c)", "GDPR Art. 32(1)(d)"], "Backups are restore-tested "
        "(new backups and a monthly random sample) and restore within the RTO.", "each new backup; monthly",
        "Restore test events: validation of row counts and content hashes, schema objects, amcheck; RTO measured.",
        None if not tests else not [e for e in open_exceptions if e["kind"] == "restore_tests"],
        f"{figs['restore_tests_passed']} of {figs['restore_tests_total']} restore tests passed; worst RTO "
        f"{_duration(figs['rto_worst_seconds'])} against {_duration(figs['rto_target_seconds'])}", "restore_tests")
    drills = t["drills_last_quarter"]
    add("DR-01", ["PCI DSS 12.10.2", "GDPR Art. 32(1)(c)"], "A full disaster-recovery drill each quarter rebuilds "
        "every target from the repository and measures RTO and RPO.", "quarterly",
        "Drill events in the 92 days before the period's end.", None if not drills else drills[-1]["outcome"] == "success",
        f"{len(drills)} drill(s); last: " + (f"RTO {_duration(drills[-1]['rto_seconds'])}, RPO "
                                             f"{_duration(drills[-1]['rpo_seconds'])}" if drills else "none"),
        "drills_last_quarter")
    incomplete = [r for r in t["audit_events"] if not all(r[k] for k in ("actor", "event_type", "outcome", "host",
                                                                         "process", "resource", "at"))]
    add("AU-01", ["PCI DSS 10.2.1", "PCI DSS 10.2.2", "GDPR Art. 30"], "Every backup, verification, restore "
        "test, restore, deletion, key operation, policy change, report and alert is an audit event with who, "
        "what, when, outcome, where from and the resource.", "every operation",
        "Checked every event of the period for the PCI DSS 10.2.2 fields.",
        None if not t["audit_events"] else not incomplete,
        f"{len(t['audit_events'])} events; incomplete: {len(incomplete)}", "audit_events")
    add("AU-02", ["PCI DSS 10.3", "GDPR Art. 5(1)(f)"], "The audit trail is append-only and tamper-evident: a "
        "hash chain, UPDATE/DELETE refused by the database, the head checkpointed into the repository.",
        "every report; on demand (`regal-backup audit verify`)", "Recomputed the whole chain and compared it "
        "with the checkpoints.", verdict.ok,
        "chain intact" if verdict.ok else f"CHAIN BROKEN at entry {verdict.first_bad_seq}: {verdict.problem}",
        "audit_chain")
    months = policy.audit.retention_months if policy.audit else 0
    add("AU-03", ["PCI DSS 10.5.1"], "Audit entries are kept at least 12 months.", "continuous",
        "Policy retention setting; deletion is refused by the database; oldest entry.",
        months >= 12, f"retention {months} months; oldest entry "
        f"{verdict.oldest.isoformat()[:10] if verdict.oldest else 'none'}", "audit_chain, policy")
    failures = [r for r in t["audit_events"] if r["outcome"] == "failure" and r["event_type"] != "alert"]
    add("AL-01", ["PCI DSS 10.7.2"], "Failures of critical controls (backups, verification, restore tests, "
        "capacity, staleness) are detected and alerted.", "continuous (sensors)",
        "Alert channels configured; alert events against failures in the period.",
        bool(policy.alerts.channels) and (not failures or bool(t["alerts"])),
        f"{len(policy.alerts.channels)} channel(s); {len(failures)} failure(s); {len(t['alerts'])} alert(s) sent",
        "alerts, audit_events")
    leftovers = [r for r in tests if any((r.get("erasures") or {}).get("still_present", {}).values())]
    add("GD-01", ["GDPR Art. 17", "GDPR Art. 30"], "Erasure requests are recorded and re-applied after every "
        "restore, so restored backups do not bring erased subjects back.", "every restore and restore test",
        "Erasure events; erasures re-applied in each restore test; subjects still present.",
        None if not tests and not t["erasures"] else not leftovers,
        f"{len(t['erasures'])} erasure request(s); {len(leftovers)} restore test(s) with erased subjects present",
        "erasures, restore_tests")
    return result


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# --- charts (SVG, drawn here: no plotting library, nothing fetched) ----------------------------------

def line_chart(points: list[tuple[datetime, float]], title: str, unit: str, target: float | None = None,
               width: int = 640, height: int = 180) -> str:
    from html import escape

    pad_l, pad_b, pad_t = 56, 24, 20
    if not points:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="60"><text x="0" y="30" '
                f'font-size="11">{escape(title)}: no data in the period</text></svg>')
    xs = [p[0].timestamp() for p in points]
    top = max([p[1] for p in points] + ([target] if target else [])) * 1.1 or 1.0
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1

    def sx(x: float) -> float:
        return pad_l + (x - x0) / (x1 - x0) * (width - pad_l - 10)

    def sy(y: float) -> float:
        return height - pad_b - y / top * (height - pad_b - pad_t)

    path = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, (_, y)) in enumerate(zip(xs, points)))
    dots = "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="#1f4e79"/>' for x, (_, y) in zip(xs, points))
    target_line = (f'<line x1="{pad_l}" x2="{width - 10}" y1="{sy(target):.1f}" y2="{sy(target):.1f}" stroke="#c00000" '
                   f'stroke-dasharray="4 3"/><text x="{width - 12}" y="{sy(target) - 3:.1f}" font-size="9" '
                   f'text-anchor="end" fill="#c00000">target {target:g} {escape(unit)}</text>') if target else ""
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
            f'<text x="{pad_l}" y="12" font-size="11" font-weight="bold">{escape(title)}</text>'
            f'<line x1="{pad_l}" y1="{height - pad_b}" x2="{width - 10}" y2="{height - pad_b}" stroke="#888"/>'
            f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{height - pad_b}" stroke="#888"/>'
            f'<text x="{pad_l - 4}" y="{sy(top / 1.1):.1f}" font-size="9" text-anchor="end">{top / 1.1:,.3g}</text>'
            f'<text x="{pad_l - 4}" y="{height - pad_b}" font-size="9" text-anchor="end">0 {escape(unit)}</text>'
            f'<text x="{pad_l}" y="{height - 8}" font-size="9">{points[0][0]:%Y-%m-%d %H:%M}</text>'
            f'<text x="{width - 10}" y="{height - 8}" font-size="9" text-anchor="end">{points[-1][0]:%Y-%m-%d %H:%M}</text>'
            f'{target_line}<path d="{path}" fill="none" stroke="#1f4e79" stroke-width="1.5"/>{dots}</svg>')


def charts(policy: Policy, evidence: Evidence) -> dict[str, str]:
    t = evidence.tables
    ok = sorted((r for r in t["backups"] if r["outcome"] == "success"), key=lambda r: r["at"])
    size = [(datetime.fromisoformat(r["at"]), r.get("bytes_stored", 0) / 1e6) for r in ok]
    duration = [(datetime.fromisoformat(r["at"]), float(r.get("seconds", 0))) for r in ok]
    rpo_points = []
    for target in sorted(policy.targets):
        times = [datetime.fromisoformat(r["at"]) for r in ok if r["target"] == target]
        rpo_points += [(b, (b - a).total_seconds() / 60) for a, b in pairwise(times)]
    rto = sorted((datetime.fromisoformat(r["at"]), r["rto_seconds"]) for r in t["restore_tests"]
                 if r.get("rto_seconds") is not None)
    return {
        "size": line_chart(size, "Backup size over time", "MB"),
        "duration": line_chart(duration, "Backup duration over time", "s"),
        "rpo": line_chart(sorted(rpo_points), "RPO timeline: minutes between good backups", "min",
                          target=policy.rpo.total_seconds() / 60),
        "rto": line_chart(rto, "Restore tests: RTO measured", "s", target=policy.rto.total_seconds()),
    }


# --- rendering -----------------------------------------------------------------------------------------

def _fetcher():  # type: ignore[no-untyped-def]
    """WeasyPrint fetches only the templates' own files: anything else (http, other paths) is refused."""
    from weasyprint import URLFetcher

    class LocalTemplatesOnly(URLFetcher):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.refused: list[str] = []

        def fetch(self, url, headers=None):  # type: ignore[no-untyped-def]
            if url.startswith("file://"):
                path = Path(url.removeprefix("file://").split("?")[0]).resolve()
                if TEMPLATES.resolve() in path.parents:
                    return super().fetch(url, headers)
            self.refused.append(url)
            raise ValueError(f"the report renderer fetches only its own template files, not {url[:80]}")

    return LocalTemplatesOnly()


def render_pdf(context: dict[str, Any], evidence: Evidence, csvs: dict[str, str]) -> tuple[bytes, list[str]]:
    """The PDF (PDF/A-3b, evidence attached) and the URLs the renderer refused to fetch."""
    import jinja2
    from weasyprint import HTML, Attachment

    if not (TEMPLATES / "compliance_report.html").is_file():
        raise RegalError(f"the report templates are missing from {TEMPLATES}",
                         "reinstall regal-backup from its wheel or the source tree (not from a zip archive)")
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                                     undefined=jinja2.StrictUndefined)
    environment.filters["duration"] = _duration
    html = environment.get_template("compliance_report.html").render(**context)
    fetcher = _fetcher()
    attachments = [Attachment(string=text, name=f"{name}.csv", relationship="Data", description=f"evidence: {name}")
                   for name, text in csvs.items()]
    attachments.append(Attachment(string=json.dumps(evidence.tables, indent=1, default=str, ensure_ascii=False),
                                  name="evidence.json", relationship="Data", description="all evidence as JSON"))
    pdf = HTML(string=html, base_url=TEMPLATES.as_uri() + "/", url_fetcher=fetcher).write_pdf(
        pdf_variant="pdf/a-3b", attachments=attachments, custom_metadata=True)
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
        signer = signers.SimpleSigner.load(str(policy.resolve_path(signing.key_file)),
                                           str(policy.resolve_path(signing.cert_file)),
                                           ca_chain_files=[str(policy.resolve_path(f)) for f in signing.chain_files],
                                           key_passphrase=passphrase)
    except (OSError, ValueError) as exc:
        raise RegalError(f"the report signing key or certificate cannot be loaded ({type(exc).__name__})",
                         "check reports.signing: the files, and the passphrase variable") from None
    if signer is None:
        raise RegalError("the report signing key or certificate cannot be loaded",
                         "check reports.signing: the files, and the passphrase variable")
    out = signers.sign_pdf(IncrementalPdfFileWriter(io.BytesIO(pdf)),
                           signers.PdfSignatureMetadata(field_name="RegalBackupReport", reason="compliance report",
                                                        name=report_id, md_algorithm="sha256"), signer=signer)
    return out.getvalue()  # type: ignore[no-any-return]


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


def build_report(policy: Policy, period: Period, *, repo: Repository | None = None,
                 trigger: dict[str, str] | None = None, now: datetime | None = None) -> ReportResult:
    repo = repo or open_repository(policy)
    now = now or datetime.now(UTC)
    trail = AuditTrail(policy, repo)
    trail.ensure_schema()
    trail_events = trail.events()  # read once: verified whole, then the period's share is the evidence
    verdict = verify_trail(trail, trail_events)
    trail.checkpoint(verdict)
    evidence = collect_evidence(policy, repo, trail_events, period, verdict, now)
    figs = figures(policy, evidence, period, now)
    found = exceptions(evidence)
    matrix = controls(policy, evidence, figs, verdict, [e for e in found if e["open"]], now)
    frameworks = {}
    for name, label in [("PCI", "PCI DSS 4.0.1"), ("SOX", "SOX ITGC"), ("GDPR", "GDPR")]:
        mapped = [c for c in matrix if name in c.frameworks]
        frameworks[label] = FAIL if any(c.result == FAIL for c in mapped) else (
            NOT_TESTED if all(c.result == NOT_TESTED for c in mapped) else PASS)
    report_id = f"{period.label}-{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    evidence_sha = evidence.sha256()
    csvs = {name: evidence.csv(name) for name in evidence.tables}
    context = {
        "report_id": report_id, "period": period, "generated_at": now, "evidence_sha256": evidence_sha,
        "verdict": verdict, "policy": policy, "facts": _policy_facts(policy), "figures": figs,
        "frameworks": frameworks, "controls": matrix, "exceptions": found, "evidence": evidence,
        "charts": charts(policy, evidence),
        "evidence_hashes": {name: hashlib.sha256(text.encode()).hexdigest() for name, text in csvs.items()},
        "PASS": PASS, "FAIL": FAIL,
    }
    pdf, refused = render_pdf(context, evidence, csvs)
    if policy.reports.signing is not None:
        pdf = sign_pdf(policy, pdf, report_id)
    digest = hashlib.sha256(pdf).hexdigest()
    key = report_key(period.label, report_id)
    repo.put_bytes(key, pdf)
    repo.put_bytes(key + ".sha256", f"{digest}  {report_id}.pdf\n".encode())
    record(policy, repo, "report_generated", key, "success",
           {"period": period.label, "sha256": digest, "evidence_sha256": evidence_sha, "chain_ok": verdict.ok,
            "frameworks": frameworks}, trigger)
    return ReportResult(report_id, period.label, key, digest, pdf, evidence_sha, verdict.ok, matrix, figs, refused)
