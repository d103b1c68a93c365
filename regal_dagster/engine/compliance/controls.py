"""The controls: what each one asks, how it is tested on the period's evidence alone (its judgement), and
the one list of exceptions (every control that did not pass, with its owner, action and due date). Which
framework requirements a control meets is declared by the frameworks (engine/compliance/frameworks/)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import pairwise
from typing import Any

from ..errors import RegalError
from ..policy import Policy
from ..settings import CronExpression
from .assurance import immutable, segregated, signed_off, tiers_met
from .charts import human_seconds
from .evidence import Period, row_at
from .facts import FEW, Facts, Judgement, few
from .frameworks.base import framework_verdict
from .frameworks.registry import citations_of, frameworks, frameworks_citing
from .results import FAIL, NOT_TESTED, OUT_OF_SCOPE, PASS, RESULTS

__all__ = ["CONTROLS", "FAIL", "NOT_TESTED", "OUT_OF_SCOPE", "PASS", "RESULTS", "Control", "ControlSpec", "Facts",
           "Judgement", "evaluate_controls", "exceptions", "framework_verdict", "framework_verdicts",
           "requirement_results"]


# --- controls --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ControlSpec:
    control_id: str
    description: str
    frequency: str
    test: str
    evidence: str  # the evidence tables
    action: str  # what the owner does when it fails
    untested_action: str  # what the owner does when there was nothing to test it on

    @property
    def mapping(self) -> tuple[str, ...]:
        """The framework requirements it meets ("PCI DSS 3.5.1", "SOX ITGC CO-1", "GDPR Art. 32(1)(b)"), as
        the frameworks declare them (engine/compliance/frameworks/)."""
        return citations_of(self.control_id)


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
        """The keys of the frameworks (frameworks.registry) that cite it."""
        return frameworks_citing(self.mapping)


def _backups_run(f: Facts) -> Judgement:
    rows = f.t["schedule_adherence"]
    scheduled, met = sum(r["scheduled"] for r in rows), sum(r["met"] for r in rows)
    missed = [f"{r['target']} {r['missed']} (first {r['first_missed'][0][:16].replace('T', ' ')})"
              for r in rows if r["missed"]]
    open_failures = f.open_failures("BK-01")
    since = f.operation_since
    finding = (f"{met} of {scheduled} scheduled backups ran (every tick of the policy's schedules from "
               f"{max(f.period.start, since) if since else f.period.start:%Y-%m-%d %H:%M} whose window closed "
               f"by {f.at:%Y-%m-%d %H:%M}); missed: {', '.join(missed) or 'none'}; "
               f"{f.figures['backups_succeeded']} of {f.figures['backups_total']} backup runs succeeded; "
               f"unresolved failures: {len(open_failures)}")
    if open_failures:
        return Judgement(False, finding)
    if not scheduled:
        return Judgement(None, "no scheduled tick's window closed in the period since the system went into "
                               f"operation ({f'{since:%Y-%m-%d %H:%M}' if since else 'never'}): schedule "
                               "adherence cannot be judged yet; " + finding)
    return Judgement(not missed, finding)


def _rpo_met(f: Facts) -> Judgement:
    achieved = f.figures["rpo_achieved_seconds"]
    missing = [k for k, v in achieved.items() if v is None]
    late = [k for k, v in achieved.items() if v is not None and v > f.policy.rpo_for(k).total_seconds()]
    # a period not over yet is judged now: the recoverability model (as `status` says it) must be within the RPO too
    now = [r for r in f.t["recoverability"] if r["rpo_breached"] or r["unrecoverable"]] \
        if f.period.interim(f.now) else []
    return Judgement(
        not missing and not late and not now,
        f"worst gap between successful backups {human_seconds(f.figures['rpo_worst_seconds'])} against an RPO "
        f"of {human_seconds(f.figures['rpo_target_seconds'])}; over the RPO: {few(late, 'tiers.csv')}"
        + (f"; never backed up: {few(missing, 'tiers.csv')}" if missing else "")
        + "".join(f"; {r['target']} now: {r['summary']}"
                  + (f" (UNRECOVERABLE: {r['unrecoverable']})" if r["unrecoverable"] else "")
                  + (" (past the RPO)" if r["rpo_breached"] and r["summary"].startswith("recoverable") else "")
                  for r in now[:FEW])
        + (f"; {len(now) - FEW} more targets now past the RPO or unrecoverable (recoverability.csv)"
           if len(now) > FEW else ""),
    )


def _verified(f: Facts) -> Judgement:
    verified = {r["resource"] for r in f.t["verifications"] if r["outcome"] == "success"}
    succeeded = [r["resource"] for r in f.t["backups"] if r["outcome"] == "success"]
    unverified = [b for b in succeeded if b not in verified]
    return Judgement(
        None if not succeeded else not unverified,
        f"{len(succeeded) - len(unverified)} of {len(succeeded)} successful backups verified"
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
    last = row_at(good[-1])
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
    repositories = f.t["repositories"]
    offsite = next((r for r in repositories if r["role"] == "off-site"), None)
    immutability = ", ".join(f"{r['role']} {r['immutability']}" for r in repositories)
    problems = []
    if offsite is None:
        problems.append("off-site copy NOT configured")
    elif offsite["same_domain_as_primary"]:
        problems.append(f"the off-site copy is NOT off-site: it shares the primary's {offsite['failure_domain']}")
    if failed := sum(v is False for v in results):
        problems.append(f"off-site check failures: {failed}")
    where = offsite["failure_domain"] if offsite else ""
    finding = "; ".join(problems or [f"off-site copy configured in another failure domain ({where})"])
    finding += f"; off-site copies checked: {sum(v is True for v in results)}; immutability: {immutability}"
    if problems:
        return Judgement(False, finding)
    return Judgement(True if any(v is True for v in results) else None, finding)


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
    if not v.ok:
        return Judgement(False, f"CHAIN BROKEN at entry {v.first_bad_seq}: {v.problem}")
    if not v.checkpoints:  # a chain rewritten whole would verify too: only a copy outside the database tells
        return Judgement(None, f"chain of {v.entries} entries intact, but no checkpoint outside the audit "
                               "database to compare it with (each report writes one: the next report tests it)")
    return Judgement(True, f"chain of {v.entries} entries intact; {v.checkpoints} checkpoint(s) outside the "
                           "audit database match")


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
            row_at(a) >= row_at(failure)
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
        "BK-01",
        "Backups of every target run on schedule and succeed; failures are resolved.",
        "hourly, daily, weekly, monthly (policy schedules, UTC)",
        "Schedule adherence: every tick of the policy's schedules since the system went into operation needs "
        "a successful backup of each target before the next tick; every failure a later success.",
        "backups, schedule_adherence, operation",
        "Fix the cause of each unresolved failure, run a backup of every target named, and confirm it "
        "verifies.",
        "Restore the backup schedule: no backup ran in the period."), _backups_run),
    (ControlSpec(
        "BK-02",
        "The recovery point objective is met: no gap between successful backups longer than the RPO.",
        "continuous (rpo_watch sensor)",
        "Longest gap between consecutive successful backups of each target, from the last one before the period "
        "to the period's end; for a period not over yet, also each target's newest recoverable point now (the "
        "recoverability model, as `regal-backup status` reports it) within the RPO and nothing unrecoverable.",
        "backups, backups_before_period, recoverability",
        "Find why backups stopped for the targets named (schedules, sensor, failures) and restore the "
        "cadence; consider a shorter schedule.", "Run backups: there is no RPO without them."), _rpo_met),
    (ControlSpec(
        "TI-01",
        "Every target has a criticality tier, and gets the backup frequency, RPO and RTO its tier implies.",
        "continuous (policy tiers)",
        "Per target: its tier from the policy; the longest interval between successful backups against the tier's "
        "frequency, the RPO achieved against its RPO, the slowest restore test against its RTO.",
        "tiers, backups, restore_tests",
        "Restore the cadence or the restore speed of the targets named, or revise their tier with the business.",
        "Give every target a tier (policy `tiers:` and each target's `tier`) and restore-test each tiered "
        "target."), tiers_met),
    (ControlSpec(
        "VR-01",
        "Every backup is verified automatically: every byte read back, authenticated and checksummed.",
        "after every backup; daily", "Matched each successful backup to a successful verification event.",
        "backups, verifications",
        "Run `regal-backup verify` on each backup named and investigate any that fails.",
        "Nothing to verify: no successful backup in the period (see BK-01)."), _verified),
    (ControlSpec(
        "EN-01",
        "Backups are encrypted at rest with AES-256 (Tink AES256-GCM-HKDF streaming AEAD) under keys "
        "protected by a master key.", "every backup",
        "The encryption check of every verification: our format, a known key, no plaintext in samples of the "
        "stored bytes, server-side encryption on S3.", "verifications, policy",
        "Quarantine the backups whose encryption check failed, find how plaintext reached the repository, "
        "and take new backups.", "Verify the period's backups (see VR-01)."), _encrypted_at_rest),
    (ControlSpec(
        "EN-02",
        "Connections that carry backup data or keys leave the host only encrypted (TLS).",
        "every connection, as configured",
        "Read each connection's settings in the policy: a DSN's sslmode (require or stricter), the S3 and "
        "Redis URL schemes. Connections on this host (Unix socket, loopback) do not leave it.", "transport",
        "Set sslmode=verify-full on the DSNs named, and https:// or rediss:// on the endpoints named.", "-"),
     _encrypted_in_transit),
    (ControlSpec(
        "KM-01",
        "Encryption keys are changed at the end of their cryptoperiod; old keys are retired once no backup "
        "needs them.", "cryptoperiod (policy)",
        "Age of the key that was primary at the period's end against the cryptoperiod; rotations and "
        "retirements listed.", "keys, key_operations",
        "Run `regal-backup keys rotate`, then retire the old key once retention has pruned its backups.",
        "Record key dates: rotate the key once so the keyset carries them."), _keys_rotated),
    (ControlSpec(
        "RD-01",
        "Backups are kept only as long as the retention policy says, and then deleted for good.",
        "prune daily (policy); proof quarterly",
        "Retention at the period's end: the period's prune logs (each vouched for by the audit trail), every "
        "deletion they planned carried out, the last one within the prune schedule, no backup kept past its "
        "planned deletion.", "prune_logs, retention_at_end, deletions",
        "Run `regal-backup prune`, check the prune schedule runs, and investigate logs the trail does not "
        "vouch for.", "Nothing to prune: no backup existed in the period."), _retention_enforced),
    (ControlSpec(
        "MD-01",
        "Backup copies are kept off-site and immutable: a second repository, S3 Object Lock where "
        "configured.",
        "every backup", "Off-site repository configured; the offsite_copy check of every verification.",
        "verifications, policy",
        "Configure `offsite:` in the policy on another file system or account (another bucket under other "
        "credentials, another region), and run `regal-backup offsite sync`.",
        "Verify the period's backups: the verification checks the off-site copy."),
     _offsite),
    (ControlSpec(
        "RT-01",
        "Backups are restore-tested (new backups and a monthly random sample) and restore within the RTO.",
        "each new backup; monthly",
        "Restore test events: row counts and content hashes, schema objects, amcheck validated; RTO measured "
        "against the objective.", "restore_tests, restores",
        "Investigate each failed or slow restore test and re-run `regal-backup restore-test` until it "
        "passes.",
        "Run `regal-backup restore-test`: no restore test ran in the period."), _restore_tested),
    (ControlSpec(
        "DR-01",
        "A full disaster-recovery drill each quarter rebuilds every target from the repository and measures "
        "RTO and RPO.", "quarterly",
        "Drill events in the 92 days before the period's end; the last must pass.", "drills_last_quarter",
        "Fix what the drill found and run `regal-backup drill` again.",
        "Run `regal-backup drill`: no drill in the last quarter."), _drilled),
    (ControlSpec(
        "SO-01",
        "Management signs off every passed restore test and drill (`regal-backup signoff`) within the policy's "
        "deadline.", "after each restore test and drill (reports.signoff_within)",
        "Matched each passed restore test and drill of the period to a sign-off event (who, role, note) recorded "
        "up to the report; unsigned past the deadline fails.", "restore_tests, drills, signoffs",
        "Have the named results reviewed and signed off (`regal-backup signoff ENTRY --by NAME --role ROLE`).",
        "Run restore tests and sign them off: nothing to sign in the period, or sign-offs still due."),
     signed_off),
    (ControlSpec(
        "SG-01",
        "Restore tests run on systems segregated from the source: another host, recorded with its account, "
        "network namespace and the repository identity used.", "each restore test",
        "The segregation evidence each restore test records (host id, OS account, network namespace, repository "
        "identity) against the source's connections; a test on the source's own host fails.",
        "restore_tests",
        "Run restore tests on a host apart from the sources (a restore-test worker in its own zone).",
        "Run restore tests (with this version: older ones recorded no segregation evidence)."), segregated),
    (ControlSpec(
        "IM-01",
        "Backups are immutable: at least one repository locks its objects in COMPLIANCE mode (GOVERNANCE mode can "
        "be lifted by privileged identities).", "every backup (repository settings)",
        "Each repository's Object Lock mode, from the policy.", "repositories",
        "Put the off-site or primary repository in an S3 bucket with Object Lock in COMPLIANCE mode.", "-"),
     immutable),
    (ControlSpec(
        "AU-01",
        "Every backup, verification, restore test, restore, deletion, key operation, policy change, report "
        "and alert is an audit event with who, what, when, outcome, where from and the resource.",
        "every operation", "Checked every event of the period for the PCI DSS 10.2.2 fields.", "audit_events",
        "Find the writer of the incomplete events and fix it.",
        "No event in the period: check that operations run and are recorded."), _events_complete),
    (ControlSpec(
        "AU-02",
        "The audit trail is append-only and tamper-evident: a hash chain, UPDATE/DELETE refused by the "
        "database, the head checkpointed into the repository.", "every report; on demand",
        "Recomputed the whole chain and compared it with the checkpoints kept outside the audit database; "
        "without one, it is not tested.", "audit_chain",
        "Treat as a security incident: find who changed the trail (`regal-backup audit verify` names the "
        "entry).", "Generate the report again: this one wrote the first checkpoint."), _chain_intact),
    (ControlSpec(
        "AU-03", "Audit entries are kept at least 12 months.", "continuous",
        "Policy retention setting; deletion is refused by the database; oldest entry.", "audit_chain, policy",
        "Set audit.retention_months to 12 or more.", "-"), _audit_kept),
    (ControlSpec(
        "AL-01",
        "Failures of critical controls (backups, verification, restore tests, drills, key operations, "
        "prunes) are detected and alerted.", "continuous (sensors)",
        "Alert channels configured; for every unresolved failed operation of the period, an alert about its "
        "target delivered after it.", "alerts, audit_events",
        "Configure an alert channel and check the alert sensors are running.", "-"), _alerted),
    (ControlSpec(
        "GD-01",
        "Erasure requests are recorded and re-applied after every restore, so restored backups do not bring "
        "erased subjects back.", "every restore and restore test",
        "Erasure events; erasures re-applied in each restore test; subjects still present.",
        "erasures, restore_tests",
        "Re-apply the erasures at the restored copies named and find why they were missed.",
        "Run a restore test: it proves the erasures are re-applied."), _erasures_hold),
]


def evaluate_controls(facts: Facts, scope: Iterable[str] | None = None) -> list[Control]:
    """Every control judged on the facts, each with the requirements it meets of the frameworks in `scope`
    (ids; all when None)."""
    scope = None if scope is None else list(scope)
    if facts.out_of_scope:
        since = facts.policy_since
        finding = ("out of scope: the period ends before the policy took effect "
                   + (f"({since:%Y-%m-%d %H:%M} UTC)" if since else "(the audit trail holds no event yet)"))
        return [Control(spec.control_id, list(citations_of(spec.control_id, scope)), spec.description,
                        spec.frequency, spec.test, OUT_OF_SCOPE, finding, spec.evidence) for spec, _ in CONTROLS]
    return [
        Control(
            spec.control_id,
            list(citations_of(spec.control_id, scope)),
            spec.description,
            spec.frequency,
            spec.test,
            (j := judge(facts)).result,
            j.finding,
            spec.evidence,
        )
        for spec, judge in CONTROLS
    ]


def requirement_results(controls: list[Control], scope: Iterable[str] | None = None) -> dict[str, dict[str, str]]:
    """Per framework (by key, in the frameworks' order; those of `scope` when given), each requirement's
    result from the results of the controls meeting it; a requirement no control meets is NOT TESTED. A
    framework citing a control that does not exist is refused."""
    known = {spec.control_id for spec, _ in CONTROLS}
    results = {c.control_id: c.result for c in controls}
    found = {}
    for key, framework in frameworks(scope).items():
        if unknown := sorted(framework.controls() - known):
            raise RegalError(f"the compliance framework {framework.name} (frameworks/{key}.py) maps its "
                             f"requirements to controls that do not exist: {', '.join(unknown)}",
                             f"map them to the report's controls: {', '.join(sorted(known))}")
        found[key] = framework.requirement_results(results)
    return found


def framework_verdicts(controls: list[Control], scope: Iterable[str] | None = None) -> dict[str, str]:
    """Each framework's verdict (by its name, in the frameworks' order), by its own rule on the results of its
    requirements (each from the controls meeting it)."""
    every = frameworks(scope)
    return {every[key].name: every[key].verdict(by_requirement.values())
            for key, by_requirement in requirement_results(controls, scope).items()}


def exceptions(
    policy: Policy, controls: list[Control], period: Period, now: datetime
) -> list[dict[str, Any]]:
    """The one list of exceptions: every control that did not pass, with its owner, action and due date."""
    specs = {spec.control_id: spec for spec, _ in CONTROLS}
    due = (period.judged_at(now) + timedelta(days=policy.reports.remediation_days)).date().isoformat()
    found: list[dict[str, Any]] = []
    for c in controls:
        if c.result in (PASS, OUT_OF_SCOPE):
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
