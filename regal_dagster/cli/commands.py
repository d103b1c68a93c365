"""The commands: each parses nothing and decides nothing; it calls the engine and renders the result."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..engine import catalog
from ..engine.audit import completed_backups
from ..engine.checks import run_checks
from ..engine.crypto import generate_master_key, load_keyring
from ..engine.errors import RegalError, UsageError
from ..engine.layout import target_of
from ..engine.policy import Policy
from ..engine.recoverability import target_recoverability
from ..engine.retention import retention_verdict, retention_verdicts
from ..engine.selection import choose_backup
from ..engine.settings import parse_duration
from ..engine.storage import open_repository
from .context import load_policy_of, open_repository_of, utc_time
from .output import Output, age, cli_invocation, manifest_summary, restored_text, size
from .pitr import restore_to_point
from .verifying import verification_verdict, verify_exit

# --- commands ------------------------------------------------------------------------------------

def cmd_init(args: argparse.Namespace, out: Output) -> int:
    from ..engine.bootstrap import init_project

    if args.no_audit and args.audit_dsn:
        raise RegalError("--no-audit and --audit-dsn contradict each other", "give one of them")
    made = init_project(Path(args.directory), args.postgres_dsn, master_key_env=args.master_key_env,
                        redis_url=args.redis_url, audit=not args.no_audit, audit_dsn=args.audit_dsn,
                        cluster_dsn=args.cluster_dsn)
    for warning in made.warnings:
        out.warn(warning)
    if made.audit is None:
        out.warn("no audit trail (--no-audit): nothing is recorded, `audit verify` and `report` fail, and PCI DSS "
                 "10.2 is not met; add `audit: {dsn: ...}` to the policy to start one")
    elif made.audit_problem:
        out.warn(f"the audit trail at {made.audit} could not be set up now: {made.audit_problem}\n  what to do: "
                 "create that database (or fix audit.dsn in the policy); events wait in the repository meanwhile")
    next_step = _next_step(f"{cli_invocation()} --policy {made.policy_path}", args.postgres_dsn, args.cluster_dsn)
    out.result(
        {"policy": str(made.policy_path), "repository": made.repository, "keyset": str(made.keyset_path),
         "master_key": made.master_key_location, "key_id": made.key_id, "audit": made.audit,
         "audit_problem": made.audit_problem, "next_step": next_step},
        f"policy      {made.policy_path} (mode 0600)\n"
        f"repository  {made.repository}\n"
        f"keyset      {made.keyset_path} (encrypted; key {made.key_id})\n"
        f"master key  {made.master_key_location}"
        + ("  (mode 0600: copy it to your secret store now; without it no backup can be read)"
           if not made.master_key_location.startswith("$") else "")
        + f"\naudit trail {made.audit or 'NONE (--no-audit)'}"
        + (" (not reachable yet: events wait in the repository)" if made.audit_problem else "")
        + f"\n\nnext: {next_step}")
    return 0


def _next_step(regal: str, postgres_dsn: str | None, cluster_dsn: str | None) -> str:
    """A server's base backups recover nothing without its WAL: the WAL stream, as a service, comes first."""
    if cluster_dsn:
        from ..engine.bootstrap import CLUSTER_TARGET

        return (f"{regal} wal stream {CLUSTER_TARGET}  (as a service: the unit regal-wal-stream@{CLUSTER_TARGET}, see "
                f"docs/pitr.md; base backups without it are not recoverable beyond their end), then {regal} backup "
                f"{CLUSTER_TARGET}" + (f" and {regal} backup main" if postgres_dsn else ""))
    return f"{regal} backup main"


def cmd_master_key(args: argparse.Namespace, out: Output) -> int:
    key = generate_master_key()
    out.result({"master_key": key}, key)
    return 0


def cmd_backup(args: argparse.Namespace, out: Output) -> int:
    from ..engine.backup import (  # source client libraries only where needed
        archive_problem,
        estimate_backup_bytes,
        run_backup,
    )

    policy = load_policy_of(args)
    if args.wait:
        try:
            wait = parse_duration(args.wait)
        except ValueError as exc:
            raise UsageError(f"--wait: {exc}", "e.g. --wait 10m") from None
        policy = policy.model_copy(update={"repository": policy.repository.model_copy(update={"lock_wait": wait})})
    keyring, repo = load_keyring(policy), open_repository(policy)
    estimate = estimate_backup_bytes(policy, args.target) if out.progress_mode() else None  # only for a display
    with out.progress(f"backup {args.target}", estimate, phase="reading the source", estimated=True) as progress:
        result = run_backup(policy, args.target, args.retention_class, repo=repo, keyring=keyring,
                            trigger={"cli": "backup"}, progress=progress, incremental=args.incremental)
    for key in ("backup_from_note", "incremental_note"):  # a standby not used; an incremental taken full
        if note := result.manifest.source.get(key):
            out.warn(note)
    for note in result.manifest.source.get("not_carried", []):  # what the backup could not hold, by name
        out.warn(f"not in the backup: {note}")
    if result.offsite_problem:
        out.warn(f"{result.offsite_problem}\n  what to do: run `regal-backup offsite sync` once the off-site "
                 "repository is reachable")
    s = manifest_summary(result.manifest)
    text = (f"backup {s['backup_id']} ({s['retention_class']}) done in {age(s['duration_seconds'])}: "
            f"{size(s['bytes_read'])} read, {size(s['bytes_stored'])} stored, "
            f"{s['tables']} tables, {s['rows']} rows, key {s['key_id']}"
            + (f", taken from the {s['taken_from']}" if s.get("taken_from") else ""))
    if args.no_verify:  # the Dagster flow checks in its own step; an operator may defer it
        out.warn(f"{s['backup_id']} is unchecked: it counts as no good backup (status, retention, restores "
                 f"--latest) until it is verified; run `regal-backup verify {s['backup_id']}` (the daily "
                 "verification does it too)")
        out.result({**s, "verification": None}, text)
        return 0
    with out.activity(f"backup {args.target}", phase="waiting for the archive to reach the backup's end"):
        if problem := archive_problem(policy, repo, keyring, result.manifest):
            out.warn(problem)
    with out.progress(f"backup {args.target}", result.manifest.plaintext_bytes,
                      phase="checking (every byte read back)") as progress:
        record = run_checks(policy, repo, keyring.reload(), s["backup_id"], trigger={"cli": "backup"},
                            progress=progress)
    failed = [f"{o.name}: {o.description}" for o in record.outcomes if not o.passed]
    verdict, around = verification_verdict(record)
    out.result({**s, "verification": {"passed": record.passed, "checked_at": record.checked_at.isoformat(),
                                      "failed": failed}}, f"{text}\n{verdict}" + "".join(f"\n  {f}" for f in failed))
    return verify_exit(record, around)


def cmd_restore(args: argparse.Namespace, out: Output) -> int:
    from ..engine.restore import choose_restore, restore_backup
    from ..engine.sources.base import RestoreRequest
    from ..engine.sources.registry import source_for

    if args.to_dir or any((args.to_time, args.to_lsn, args.to_name, args.preview, args.base_backup, args.with_wal)):
        return restore_to_point(args, out)
    if not args.to:
        raise UsageError("say where to restore to", "add --to (a DSN, a directory or a file, by the target's kind), "
                                                    "or --to-dir DIR for a postgres_cluster target")
    policy, repo, keyring = open_repository_of(args)
    selected = choose_restore(policy, repo, keyring, args.backup_id, args.target, latest=args.latest,
                              before=utc_time(args.before, "--before") if args.before else None,
                              trigger={"cli": "restore"})
    for note in selected.notes:
        out.note(note)
    manifest = selected.manifest
    with out.progress(f"restore {manifest.backup_id}", manifest.plaintext_bytes) as progress:
        request = RestoreRequest(args.to, jobs=args.jobs or policy.jobs_for(manifest.target),
                                 drop_existing=args.drop_existing,
                                 options=source_for(manifest.kind).restore_options(vars(args)),
                                 accept_ledger_rollback=args.accept_ledger_rollback, progress=progress)
        result = restore_backup(policy, repo, keyring, manifest, request, pre_hook=args.pre_hook,
                                post_hook=args.post_hook, trigger={"cli": "restore"})
    out.result(result.to_json(), restored_text(result))
    return 0 if result.ok else 3


def _work_dir(args: argparse.Namespace, policy: Policy) -> Path | None:
    """Where scratch servers go: --work-dir, else the policy's restore_tests.work_dir, else the temp dir."""
    chosen = args.work_dir or policy.restore_tests.work_dir
    return policy.resolve_path(chosen) if chosen else None


def cmd_restore_test(args: argparse.Namespace, out: Output) -> int:
    from ..engine.restore_test import run_restore_test
    from ..engine.sources.registry import source_for

    policy, repo, keyring = open_repository_of(args)
    target = args.target or _the_only_target(policy, args.backup_id)
    selected = choose_backup(policy, repo, keyring, target, backup_id=args.backup_id, trigger={"cli": "restore-test"})
    for note in selected.notes:
        out.note(note)
    manifest = selected.manifest
    with out.progress(f"restore test of {manifest.backup_id}", manifest.plaintext_bytes) as progress:
        result = run_restore_test(policy, repo, keyring, manifest, jobs=args.jobs, work_dir=_work_dir(args, policy),
                                  trigger={"cli": "restore-test"}, progress=progress)
    phases = ", ".join(f"{name} {age(s)}" for name, s in result.seconds.items() if name != "total")
    passed = source_for(manifest.kind).restore_test_proves
    verdict = (f"validation passed: {passed}"
               if result.validation_passed else "VALIDATION FAILED:\n" + "\n".join(f"  - {p}" for p in result.problems))
    text = (f"restore test of {result.backup_id} (age {age(result.backup_age_seconds)}): RTO "
            f"{age(result.rto_seconds)} against a target of {age(result.rto_target_seconds)} "
            f"({'within' if result.rto_within_target else 'OVER'}) ({phases})\n{verdict}")
    text += "".join(f"\n  recovery to {r['goal'].removeprefix('the ')}: " + (
        f"promoted after {age(r['rto_seconds'])} at {r.get('replayed_to_lsn')}, newest commit {r.get('newest_commit')}"
        if r.get("rto_seconds") is not None else "did not start")
        + (f", RPO {age(r['rpo_seconds'])}" if r.get("rpo_seconds") is not None else "")
        + (f", {r['facts_checked']} fact(s) checked" if r.get("facts_checked") else "")
        + ("" if not r["problems"] else " - FAILED") for r in result.details.get("recoveries", []))
    if point := result.details.get("restore_point"):
        text += f"\n  restore point {point['name']}: {point['note']}"
    out.result(result.to_json(), text)
    return 0 if result.validation_passed and result.rto_within_target else 3


def _the_only_target(policy: Policy, backup_id: str | None) -> str:
    """The target a command means when none was named: the policy's only one (a backup id names its own)."""
    if backup_id or len(policy.targets) == 1:
        return target_of(backup_id) if backup_id else next(iter(policy.targets))
    raise UsageError(f"the policy has {len(policy.targets)} targets: say which one",
                     f"add --target with one of {', '.join(sorted(policy.targets)) or '(none)'}, or give a BACKUP_ID")


def cmd_drill(args: argparse.Namespace, out: Output) -> int:
    from ..engine.drill import run_drill

    policy, repo, keyring = open_repository_of(args)
    with out.progress("disaster-recovery drill") as progress:
        record = run_drill(policy, repo, keyring, jobs=args.jobs, work_dir=_work_dir(args, policy), progress=progress)
    lines = [f"drill {record['drill_id']}: everything but the repository and the keys lost at {record['loss_at']}"]
    for t in record["targets"]:
        if t["recovered"]:
            lines.append(f"  {t['target']}: restored {t['restored']['backup_id']} in "
                         f"{age(t['restored']['restore_seconds'])};"
                         f" RPO {age(t['rpo_seconds'])} against {age(t['rpo_target_seconds'])}"
                         + ("" if t["rpo_within_target"] else " (MISSED)") + (
                             f"; {len(t['tried'])} newer backup(s) did not restore" if t["tried"] else ""))
        else:
            lines.append(f"  {t['target']}: NOT RECOVERED ({len(t['tried'])} backup(s) tried)")
    lines.append(f"RTO {age(record['rto_seconds'])} against {age(record['rto_target_seconds'])}: "
                 + ("PASSED" if record["passed"] else "FAILED"))
    out.result(record, "\n".join(lines))
    return 0 if record["passed"] else 3


def cmd_gdpr_erase(args: argparse.Namespace, out: Output) -> int:
    from ..engine.gdpr import record_erasure

    requested = utc_time(args.requested_at, "--requested-at") if args.requested_at else datetime.now(UTC)
    policy, repo, keyring = open_repository_of(args)
    erasure = record_erasure(policy, repo, keyring, args.target, args.subject,
                             requested_at=requested, reference=args.reference or "")
    out.result(erasure.__dict__, f"erasure recorded for target {erasure.target} (subject {erasure.subject_hash[:12]}…, "
                                 f"requested {erasure.requested_at}); it is re-applied after every restore")
    return 0


def cmd_gdpr_list(args: argparse.Namespace, out: Output) -> int:
    from ..engine.gdpr import load_ledger

    _, repo, keyring = open_repository_of(args)
    ledger = load_ledger(repo, keyring)
    lines = [f"{e.target:12} {e.subject_hash[:16]}  requested {e.requested_at}  {e.reference}" for e in ledger.erasures]
    out.result({"erasures": [e.__dict__ for e in ledger.erasures]}, "\n".join(lines) or "no erasures recorded")
    return 0


def cmd_prune(args: argparse.Namespace, out: Output) -> int:
    from ..engine.retention import run_prune

    policy, repo, keyring = open_repository_of(args)
    with out.activity("reading the repository" if args.dry_run or args.check else "pruning"):
        report = run_prune(policy, repo, datetime.now(UTC), dry_run=args.dry_run or args.check, keyring=keyring)
    lines = []
    now = report.at
    for decisions in report.decisions.values():
        for d in decisions:
            verdict = retention_verdict(d, policy.prune.cron, now)
            verb = "keep" if d.keep else ("would delete" if report.dry_run else "deleted")
            when = ("" if not report.dry_run and not d.keep else f" [{verdict.summary}]")
            lines.append(f"{verb:12} {d.backup_id:40} {'; '.join(d.reasons)}{when}")
    lines.append(f"{len(report.leftovers)} object(s) no backup needs {'to remove' if report.dry_run else 'removed'}"
                 + (f"; {len(report.locked)} kept by Object Lock until their date" if report.locked else "")
                 + (f"; {len(report.offsite_deleted)} backup(s) removed off-site" if report.offsite_deleted else ""))
    if args.check:
        due = [d.backup_id for ds in report.decisions.values() for d in ds
               if not d.keep and d.backup_id not in report.past_retention]
        lines.append("retention holds: nothing is kept past its retention" if not report.past_retention
                     else f"PAST RETENTION: {', '.join(report.past_retention)}")
        if due:
            lines.append(f"{len(due)} backup(s) due for deletion by the next prune (not past retention yet)")
    body = {k: v for k, v in report.to_json().items() if k not in ("format", "version")}
    body["decisions"] = {target: [retention_verdict(d, policy.prune.cron, now).to_json() for d in decisions]
                         for target, decisions in report.decisions.items()}
    out.result({**body, "past_retention": report.past_retention}, "\n".join(lines))
    return 3 if args.check and report.past_retention else 0


def cmd_keys_list(args: argparse.Namespace, out: Output) -> int:
    from ..engine.keys import key_inventory

    policy, repo, keyring = open_repository_of(args)
    keys = key_inventory(policy, repo, keyring)
    lines = [f"{'KEY':>10}  {'STATUS':12} {'CREATED':25} {'PRIMARY SINCE':25} {'RETIRED':25} BACKUPS"]
    lines += [f"{k['key_id']:>10}  {k['status']:12} {k['created_at'] or '?':25} {k['primary_since'] or '-':25} "
              f"{k['retired_at'] or '-':25} {len(k['backups'])}{' + GDPR ledger' if k['gdpr_ledger'] else ''}"
              for k in keys]
    out.result({"keys": keys}, "\n".join(lines))
    return 0


def cmd_keys_rotate(args: argparse.Namespace, out: Output) -> int:
    from ..engine.keys import rotate_key

    keyring = rotate_key(load_policy_of(args))
    out.result({"primary_key_id": keyring.primary_key_id},
               f"key {keyring.primary_key_id} is now primary: new backups use it; older backups stay readable "
               "with the earlier keys (retire one with `regal-backup keys retire KEY_ID`)")
    return 0


def cmd_keys_retire(args: argparse.Namespace, out: Output) -> int:
    from ..engine.keys import retire_key

    with out.activity(f"retiring key {args.key_id}" + (" (re-encrypting)" if args.reencrypt else "")):
        report = retire_key(load_policy_of(args), args.key_id, reencrypt=args.reencrypt)
    text = [f"key {report.key_id} retired: its material is destroyed"]
    if report.reencrypted:
        text.append(f"re-encrypted and verified under the primary key: {', '.join(report.reencrypted)}")
    if report.ledger_reencrypted:
        text.append("the GDPR erasure ledger was re-encrypted too")
    if report.locked_leftovers:
        text.append(f"{len(report.locked_leftovers)} old object(s) stay under Object Lock until their date "
                    "(unreadable now; prune removes them then)")
    out.result(report.__dict__, "\n".join(text))
    return 0


def cmd_audit_verify(args: argparse.Namespace, out: Output) -> int:
    from ..engine.audit import AuditTrail, verify_trail

    policy, repo, keyring = open_repository_of(args)
    trail = AuditTrail(policy, repo, keyring)
    trail.ensure_schema()
    verdict = verify_trail(trail, full=not getattr(args, "resume", False))
    trail.checkpoint(verdict)
    if verdict.ok:
        resumed = verdict.resumed_from
        text = (f"audit trail intact: {verdict.entries} entries, head {verdict.head_hash} (entry {verdict.head_seq}), "
                f"{verdict.checkpoints} checkpoint(s) match"
                + (f", and so does the keyset's anchor (entry {verdict.anchor.seq})" if verdict.anchor else "")
                + (f"; recomputed from the authentic checkpoint of entry {resumed['seq']} (written {resumed['at']}, "
                   "after a walk up to it; without --resume every entry is recomputed)" if resumed else ""))
    else:
        where = "" if verdict.first_bad_seq is None else f" at entry {verdict.first_bad_seq}"
        text = f"AUDIT TRAIL BROKEN{where}: {verdict.problem}"
    if verdict.spooled:
        text += f"\n{verdict.spooled} event(s) wait in the repository's spool for the audit database"
    verdict_json = verdict.to_json()
    out.result({"intact": verdict_json.pop("ok"), **verdict_json,
                "anchor": verdict.anchor.to_json() if verdict.anchor else None}, text)
    return 0 if verdict.ok else 3


def cmd_report(args: argparse.Namespace, out: Output) -> int:
    from ..engine.compliance.report import Period, build_report

    policy = load_policy_of(args)
    period = Period.parse(args.period) if args.period else Period.previous_month(datetime.now(UTC))
    with out.activity(f"compliance report {period.label}"):
        # a future period or an unknown framework: exit 2
        result = build_report(policy, period, trigger={"cli": "report"}, scope=args.framework)
    written = []
    if args.output:
        pdf_path = Path(args.output)
        oscal_path = pdf_path.with_name(pdf_path.stem + ".oscal-ar.json")
        pdf_path.write_bytes(result.pdf)
        oscal_path.write_bytes(result.oscal)
        written = [str(pdf_path), str(oscal_path)]
    failed = [c.control_id for c in result.controls if c.result == "FAIL"]
    untested = [c.control_id for c in result.controls if c.result == "NOT TESTED"]
    out.result({"report_id": result.report_id, "key": result.key, "oscal_key": result.oscal_key,
                "sha256": result.sha256, "evidence_sha256": result.evidence_sha256,
                "chain_ok": result.chain_ok, "interim": result.interim, "frameworks": result.frameworks,
                "exceptions": len(result.exceptions),
                "controls": {c.control_id: c.result for c in result.controls}, "written": written},
               f"report {result.report_id}{' (INTERIM: the period has not ended)' if result.interim else ''}"
               f" stored as {result.key} (SHA-256 {result.sha256}), OSCAL results as {result.oscal_key}"
               + (f"; written to {' and '.join(written)}" if written else "")
               + "\n" + ", ".join(f"{name} {verdict}" for name, verdict in result.frameworks.items())
               + f"\n{len(result.exceptions)} exception(s); controls failed: {', '.join(failed) or 'none'}; "
               f"not tested: {', '.join(untested) or 'none'}"
               + ("" if result.chain_ok else "\nTHE AUDIT TRAIL IS BROKEN: see `regal-backup audit verify`"))
    return 0 if result.chain_ok else 3


def cmd_upgrade(args: argparse.Namespace, out: Output) -> int:
    from ..engine.upgrade import upgrade_repository

    report = upgrade_repository(load_policy_of(args))
    if report.already_current:
        text = "the repository is current (format 3: every document encrypted); nothing to do"
    else:
        text = (f"encrypted {len(report.manifests_sealed)} manifest(s) and {report.documents_sealed} other "
                f"document(s); the repository is now format 3 (was {report.upgraded_from})")
    if report.keyset_upgraded:
        text += "\nthe keyset gained document keys (keep a copy of the new keyset file with your key backups)"
    text += "".join(f"\nNOT ENCRYPTED {key}: {why}" for key, why in report.refused.items())
    out.result(report.__dict__, text)
    return 3 if report.refused else 0


def cmd_demo(args: argparse.Namespace, out: Output) -> int:
    if args.start_postgres or args.stop_postgres:  # no demo run, no Dagster loaded
        from .demo_server import demo_postgres

        done = demo_postgres(Path(args.dir), start=args.start_postgres)
        out.result(done, done.pop("text"))
        return 0
    from .demo import run_demo

    summary = run_demo(Path(args.dir), scale=args.scale, keep_running=args.keep_running,
                       echo=not args.json and out.verbosity >= 0)
    out.result(summary, summary["text"])
    return 0 if summary["passed"] else 3


def cmd_show(args: argparse.Namespace, out: Output) -> int:
    policy, repo, keyring = open_repository_of(args)
    manifest = catalog.load_manifest(repo, keyring, args.backup_id)
    now = datetime.now(UTC)
    model = target_recoverability(policy, repo, keyring, manifest.target, now, completed_backups(policy, repo))
    status = next(s for m, s in model.statuses if m.backup_id == manifest.backup_id)
    recovery = model.backups[manifest.backup_id]
    verdict = retention_verdicts(policy, repo, keyring, now, manifest.target).get(manifest.backup_id)
    record = status.record if status.problem is None else None
    pin = model.holds.pin_of(manifest.backup_id, now) if model.holds else None
    note = model.holds.notes.get(manifest.backup_id) if model.holds else None
    lock: dict[str, str] | None = ({"mode": str(manifest.object_lock.get("mode")),
                                    "retain_until": manifest.locked_until.isoformat()}
                                   if manifest.object_lock and manifest.locked_until else None)
    objects: list[dict[str, Any]] = [{"name": o.name, "key": o.key, "content": o.content, "bytes_stored": o.size,
                "bytes_read": o.plaintext_size, "plaintext_fingerprint": o.plaintext_sha256,
                "stored_sha256": o.stored_sha256, "key_id": o.encryption.key_id} for o in manifest.objects]
    tables: list[dict[str, Any]] = [{"table": name, "rows": rows} for name, rows in manifest.table_rows().items()]
    checks = [{"name": o.name, "passed": o.passed, "severity": o.severity, "description": o.description}
              for o in record.outcomes] if record else []
    payload = {**manifest_summary(manifest), "status": status.status, "status_note": status.problem,
               "recovery": recovery.to_json(), "unrecoverable": model.unrecoverable,
               "checked_at": record.checked_at.isoformat() if record else None, "checks": checks,
               "retention": verdict.to_json() if verdict else None, "object_lock": lock,
               "trigger": manifest.trigger, "tool_versions": manifest.tool_versions, "objects": objects,
               "table_rows": tables, "legal_hold": pin.to_json() if pin else None, "annotation": note}
    lines = [f"backup      {manifest.backup_id} ({manifest.kind} target {manifest.target}, {manifest.retention_class})",
             f"taken       {manifest.started_at:%Y-%m-%d %H:%M:%S} UTC, {age(manifest.duration_seconds)}, by "
             + (", ".join(f"{k} {v}" for k, v in manifest.trigger.items()) or "?"),
             f"size        {size(manifest.plaintext_bytes)} read, {size(manifest.stored_bytes)} stored",
             f"status      {status.status}" + (f" ({status.problem})" if status.problem else "")
             + (f", checked {record.checked_at:%Y-%m-%d %H:%M} UTC" if record else ""),
             f"recovery    {recovery.note}" + (f"\n            UNRECOVERABLE: {model.unrecoverable}"
                                                if model.unrecoverable else ""),
             "retention   " + (verdict.summary + f" ({'; '.join(verdict.reasons)})" if verdict else "?"),
             "lock        " + (f"S3 Object Lock {lock['mode']} until {lock['retain_until'][:16]}" if lock else "none"),
             "legal hold  " + (pin.summary if pin else "none")]
    if note:
        lines.append(f"annotation  {note}")
    if checks:
        lines.append("checks")
        lines += [f"  {'OK  ' if c['passed'] else c['severity']:5} {c['name']:18} {c['description']}" for c in checks]
    lines.append(f"objects     {len(objects)}")
    lines += [f"  {o['name']:40} {size(o['bytes_stored']):>10}  key {o['key_id']}  {o['content']}" for o in objects]
    if tables:
        lines.append(f"tables      {len(tables)}, {sum(t['rows'] for t in tables)} rows")
        lines += [f"  {t['table']:50} {t['rows']:>12}" for t in tables]
    out.result(payload, "\n".join(lines))
    return 3 if status.status == "rolled_back" or model.unrecoverable else 0


def cmd_metrics(args: argparse.Namespace, out: Output) -> int:
    from ..engine.metrics import collect, exposure_note, listen_address, serve, write_textfile

    policy, repo, keyring = open_repository_of(args)
    if args.cloudwatch:
        from .monitoring import publish_to_cloudwatch

        return publish_to_cloudwatch(policy, repo, keyring, out)
    if args.textfile:
        path = Path(args.textfile)
        families = write_textfile(policy, repo, keyring, path)
        out.result({"textfile": str(path), "metric_families": families},
                   f"wrote {families} metric families to {path}")
        return 0
    host, port = listen_address(args.listen)
    collect(policy, repo, keyring)  # a policy or repository problem shows now, not at the first scrape
    if note := exposure_note(host):
        out.note(note)
    serve(policy, repo, keyring, host, port, cache_seconds=args.cache_seconds,
          ready=lambda where: out.info(f"serving Prometheus metrics on {where}/metrics (Ctrl-C stops)"))
    return 0


# --- wiring --------------------------------------------------------------------------------------

