"""`verify`: one backup, the newest or unchecked ones, or every backup (`--all`); in full, or a sampled deep read
(`--sample N%`, reproducible with `--seed`), with a summary table when more than one backup is read."""

from __future__ import annotations

import argparse
from typing import Any

from ..engine import catalog
from ..engine.checks import CheckRecord, run_checks, unchecked_backups
from ..engine.crypto import Keyring
from ..engine.errors import RegalError, UsageError
from ..engine.layout import target_of
from ..engine.manifest import Manifest
from ..engine.policy import Policy
from ..engine.storage import Repository
from ..engine.verify import ReadSample
from .context import open_repository_of
from .output import Output, size


def cmd_verify(args: argparse.Namespace, out: Output) -> int:
    policy, repo, keyring = open_repository_of(args)
    many = args.latest or args.unchecked or args.all
    if bool(many) == bool(args.backup_id) or (args.all and (args.latest or args.unchecked)):
        raise UsageError("say which backup to verify", "give a BACKUP_ID, or --latest or --unchecked (with --target "
                                                       "for one target), or --all for every backup")
    if args.target and not many:
        raise UsageError("--target goes with --latest, --unchecked or --all", "drop --target, or add --latest")
    if args.seed and not args.sample:
        raise UsageError("--seed goes with --sample", "add --sample N% (e.g. --sample 10%), or drop --seed")
    try:
        sample = ReadSample.parse(args.sample, args.seed) if args.sample else None
    except ValueError as exc:
        raise UsageError(f"--sample: {exc}", "give the share of objects to read in full, e.g. --sample 10%") from None
    if many:
        return _verify_each(args, out, policy, repo, keyring, sample)
    try:  # the size, for the progress display; a manifest that is refused is the manifest check's finding
        total: int | None = catalog.load_manifest(repo, keyring, args.backup_id).plaintext_bytes
    except RegalError:
        total = None
    with out.progress(f"verify {args.backup_id}", total) as progress:
        record = run_checks(policy, repo, keyring, args.backup_id, jobs=args.jobs, trigger=_verify_trigger(args),
                            progress=progress, sample=sample)
    text = "\n".join(f"{'OK  ' if o.passed else o.severity:5} {o.name:10} {o.description}" for o in record.outcomes)
    verdict, around = verification_verdict(record)
    out.result({**_result_json(record), "sample": _sample_of(record, sample)},
               f"{text}\nbackup {record.backup_id}: {verdict}" + _sample_note(record, sample))
    return verify_exit(record, around)


def verification_verdict(record: CheckRecord) -> tuple[str, list[str]]:
    """One line for people, and the checks around the backup that failed (ERROR: a key, the off-site copy)."""
    around = [o.name for o in record.outcomes if not o.passed and o.severity == "ERROR"]
    verdict = ("FAILED verification" if not record.passed else
               f"verified, but {' and '.join(around)} failed" if around else "verified: every check passed")
    return verdict, around


def verify_exit(record: CheckRecord, around: list[str]) -> int:
    """3: the backup failed, or a check found damage or tampering around it (WAL deleted or rolled back), or what
    recovery cannot pass (a WAL segment missing or unreadable: every point past it is unrecoverable); 1: a check
    around the backup failed (a key, the off-site copy)."""
    damaged = any(not o.passed and o.metadata.get("integrity_failure") for o in record.outcomes)
    return 3 if not record.passed or damaged or record.recovery_bound else 1 if around else 0


def _unrecoverable_past(record: CheckRecord) -> str | None:
    """What a check found that recovery cannot pass (a WAL segment), though the backup itself may have passed."""
    bound = record.recovery_bound
    return None if bound is None else bound.failing_object or bound.description


def _verify_trigger(args: argparse.Namespace) -> dict[str, str]:
    return {"cli": "verify", **({"wal": "all"} if args.all_wal else {})}


def _sample_of(record: CheckRecord, sample: ReadSample | None) -> dict[str, Any] | None:
    """The sample the integrity check drew (None: every object was read in full)."""
    integrity = record.outcome("integrity")
    drawn = integrity.metadata.get("sample") if integrity else None
    return drawn if sample and isinstance(drawn, dict) else None


def _sample_note(record: CheckRecord, sample: ReadSample | None) -> str:
    if sample is None:
        return ""
    if _sample_of(record, sample) is None:
        return f"\n  {record.backup_id} was read in full: a backup not yet good is never judged on a sample"
    return ""


def _result_json(record: CheckRecord) -> dict[str, Any]:
    return {"backup_id": record.backup_id, "target": target_of(record.backup_id), "passed": record.passed,
            "unrecoverable_past": _unrecoverable_past(record), "checked_at": record.checked_at.isoformat(),
            "checks": [{"name": o.name, "passed": o.passed, "severity": o.severity, "description": o.description,
                        "failing_object": o.failing_object} for o in record.outcomes]}


def _chosen(args: argparse.Namespace, repo: Repository, keyring: Keyring, target: str,
            lines: list[str]) -> tuple[list[Manifest], bool]:
    """The backups of one target to verify, oldest first; whether --latest found none."""
    if args.all:
        return sorted(catalog.list_backups(repo, keyring, target)[0], key=lambda m: m.started_at), False
    chosen = unchecked_backups(repo, keyring, target) if args.unchecked else []
    newest = next(catalog.newest_first(repo, keyring, target), None) if args.latest else None
    if args.latest and newest is None:
        lines.append(f"{target}: no backup to verify")
        return chosen, True
    if args.unchecked and not chosen and newest is None:
        lines.append(f"{target}: no unchecked backup")
    chosen += [newest] if newest is not None and newest.backup_id not in {m.backup_id for m in chosen} else []
    return chosen, False


def _verify_each(args: argparse.Namespace, out: Output, policy: Policy, repo: Repository, keyring: Keyring,
                 sample: ReadSample | None) -> int:
    """Per target (every one, or --target): --all every backup; --latest its newest backup, whatever its status;
    --unchecked every backup no check record vouches for; both: what the daily verification does."""
    targets = [args.target] if args.target else sorted(policy.targets)
    results: list[dict[str, Any]] = []
    lines: list[str] = []
    worst = 0
    plan: list[Manifest] = []
    for target in targets:
        policy.target(target)
        chosen, none = _chosen(args, repo, keyring, target, lines)
        if none:
            results.append({"target": target, "backup_id": None, "passed": None, "checks": []})
            worst = max(worst, 1)
        plan += chosen
    total = len(plan)
    for number, manifest in enumerate(plan, 1):
        with out.progress(f"verify {number}/{total} {manifest.backup_id}", manifest.plaintext_bytes) as progress:
            record = run_checks(policy, repo, keyring, manifest.backup_id, jobs=args.jobs,
                                trigger=_verify_trigger(args), progress=progress, sample=sample)
        _, around = verification_verdict(record)
        failed = [f"{o.name}: {o.description}" for o in record.outcomes if not o.passed]
        lines.append(f"{manifest.target}: {record.backup_id} " + (
            "verified: every check passed" if not failed else
            ("FAILED verification" if not record.passed else "verified, with failures") + "\n  " + "\n  ".join(failed))
            + _sample_note(record, sample))
        drawn = _sample_of(record, sample)
        results.append({**_result_json(record), "sample": drawn,
                        "objects_read": drawn["objects_read"] if drawn else len(manifest.objects),
                        "objects_total": len(manifest.objects),
                        "bytes_read": _bytes_read(record, manifest)})
        worst = max(worst, verify_exit(record, around))
    read = [r for r in results if r.get("backup_id")]
    summary = {"backups": len(read), "passed": sum(bool(r["passed"]) for r in read),
               "failed": sum(not r["passed"] for r in read), "bytes_read": sum(r["bytes_read"] for r in read),
               "sample": {"percent": sample.percent, "seed": sample.seed} if sample else None}
    out.result({"verified": results, "summary": summary}, "\n".join(lines + _table(read, summary, sample)))
    return worst


def _bytes_read(record: CheckRecord, manifest: Manifest) -> int:
    integrity = record.outcome("integrity")
    value = integrity.metadata.get("bytes_read") if integrity else None
    return int(value) if isinstance(value, int) else 0 if integrity is None or not integrity.passed \
        else manifest.stored_bytes


def _table(read: list[dict[str, Any]], summary: dict[str, Any], sample: ReadSample | None) -> list[str]:
    """The summary table: one row per backup read, and the totals."""
    if len(read) < 2 and sample is None:
        return []
    rows = [f"\n{'TARGET':12} {'BACKUP':40} {'RESULT':8} {'OBJECTS READ':>12} {'BYTES READ':>10}"]
    rows += [f"{r['target']:12} {r['backup_id']:40} {'passed' if r['passed'] else 'FAILED':8} "
             f"{str(r['objects_read']) + '/' + str(r['objects_total']):>12} {size(r['bytes_read']):>10}"
             for r in read]
    rows.append(f"{summary['backups']} backup(s): {summary['passed']} passed, {summary['failed']} failed, "
                f"{size(summary['bytes_read'])} read"
                + (f"; sample {sample.percent:g}% with seed {sample.seed} (repeat it with --seed {sample.seed})"
                   if sample else ""))
    return rows
