"""What the audit trail and the compliance report cost at a realistic size.

    .venv/bin/python benchmarks/audit_report.py --dsn postgresql://postgres@127.0.0.1:5432/postgres

Creates a scratch database on that server, measures `append` (one event as the engine writes it: its
own connection, the advisory lock, the chain head), then loads a year of history (hourly backups, each
verified; a restore test a day; a drill a quarter; about 17,600 events, chained like `append` chains
them) and measures `audit verify` over all of it and the monthly report (evidence, controls, charts,
WeasyPrint PDF/A-3b with attachments). Prints a table with wall seconds, peak RSS and the PDF's size.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from common import print_table
from pypdf import PdfReader

from regal_dagster.engine.audit import (
    DDL,
    FIELDS,
    GENESIS,
    AuditEvent,
    AuditTrail,
    ChainVerdict,
    canonical_details,
    verify_trail,
)
from regal_dagster.engine.compliance.report import Period, build_report
from regal_dagster.engine.crypto import create_keyset, generate_master_key
from regal_dagster.engine.policy import policy_from_dict
from regal_dagster.engine.repository_format import initialize
from regal_dagster.engine.storage import open_repository


def year_of_events(end: datetime) -> list[AuditEvent]:
    events: list[AuditEvent] = []
    start = end - timedelta(days=365)

    def add(at: datetime, kind: str, resource: str, outcome: str, details: dict[str, object]) -> None:
        events.append(AuditEvent(0, at, "service:dagster (regal)", kind, outcome, "backup-host", "dagster[1]",
                                 str(uuid.uuid4()), resource, canonical_details(details)))

    hour = start
    while hour < end:
        backup_id = f"pos-{hour:%Y%m%dT%H%M%SZ}-abcdef"
        ok = hour.hour != 3 or hour.day % 9  # now and then a failure
        add(hour, "backup", backup_id, "success" if ok else "failure",
            {"target": "pos", "retention_class": "daily" if hour.hour == 2 else "hourly", "bytes_stored": 223_900_000,
             "seconds": 5.7} if ok else {"target": "pos", "error": "cannot connect to PostgreSQL"})
        if ok:
            add(hour + timedelta(minutes=1), "verification", backup_id, "success",
                {"checks": {"manifest": True, "integrity": True, "encryption": True, "size": True}, "failed": []})
        if hour.hour == 4:
            add(hour + timedelta(minutes=5), "restore_test", backup_id, "success",
                {"target": "pos", "rto_seconds": 19.4, "rto_target_seconds": 14400, "backup_age_seconds": 7200,
                 "validation_passed": True, "problems": [], "erasures": {}})
        if hour.day == 1 and hour.hour == 5 and hour.month in (1, 4, 7, 10):
            add(hour, "dr_drill", f"drill-{hour:%Y%m%d}", "success",
                {"rto_seconds": 17.7, "rto_target_seconds": 14400, "rpo_seconds": 945, "rpo_target_seconds": 3600})
        hour += timedelta(hours=1)
    return events


def fleet_events(end: datetime, targets: list[str]) -> list[AuditEvent]:
    """A year of a fleet: each target backed up daily (02:00 plus a few seconds each) and verified, restore-tested
    each Sunday; in time order."""
    events: list[AuditEvent] = []
    day = (end - timedelta(days=365)).replace(hour=2, minute=0)
    while day < end:
        for i, target in enumerate(targets):
            at = day + timedelta(seconds=2 * i)
            backup_id = f"{target}-{at:%Y%m%dT%H%M%SZ}-abcdef"
            details = {"target": target, "retention_class": "daily", "bytes_stored": 1_200_000, "seconds": 1.1}
            events.append(AuditEvent(0, at, "service:dagster (regal)", "backup", "success", "backup-host",
                                     "dagster[1]", str(uuid.uuid4()), backup_id, canonical_details(details)))
            events.append(AuditEvent(0, at + timedelta(seconds=1), "service:dagster (regal)", "verification",
                                     "success", "backup-host", "dagster[1]", None, backup_id, canonical_details(
                                         {"checks": {"integrity": True, "encryption": True}, "failed": []})))
            if day.weekday() == 6:
                events.append(AuditEvent(0, at + timedelta(hours=2), "service:dagster (regal)", "restore_test",
                                         "success", "backup-host", "dagster[1]", None, backup_id, canonical_details(
                                             {"target": target, "rto_seconds": 3.2, "rto_target_seconds": 14400,
                                              "backup_age_seconds": 7200, "validation_passed": True,
                                              "problems": [], "erasures": {}})))
        day += timedelta(days=1)
    return sorted(events, key=lambda e: e.at)


def load(dsn: str, events: list[AuditEvent]) -> None:
    prev = GENESIS
    with psycopg.connect(dsn) as conn:
        conn.execute(DDL)
        with conn.cursor().copy(f"COPY regal_audit.events ({', '.join(FIELDS)}, prev_hash, hash) FROM STDIN") as copy:
            for seq, event in enumerate(events, start=1):
                numbered = AuditEvent(seq, *[getattr(event, n) for n in FIELDS[1:]])
                digest = numbered.chained_hash(prev)
                copy.write_row([getattr(numbered, n) for n in FIELDS] + [prev, digest])
                prev = digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--targets", type=int, default=1, help="more than 1: a fleet of this many targets, each "
                        "backed up daily for a year (the issue 33 goal: 500 in 60 s)")
    parser.add_argument("--framework", action="append", help="frameworks in scope (default: the policy's)")
    parser.add_argument("--pdf", type=Path, help="write the report's PDF here, to look at")
    args = parser.parse_args()
    name = f"regal_bench_audit_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    audit_dsn = args.dsn.rsplit("/", 1)[0] + f"/{name}"
    rows: list[tuple[str, float, str]] = []
    names = ["pos"] if args.targets == 1 else [f"store_{i:03d}" for i in range(args.targets)]
    try:
        with tempfile.TemporaryDirectory(prefix="regal-audit-bench-") as tmp:
            os.environ["REGAL_BENCH_MASTER_KEY"] = generate_master_key()
            policy = policy_from_dict({
                "repository": {"url": "repository"},
                "encryption": {"keyset": "keyset.json", "master_key": {"env": "REGAL_BENCH_MASTER_KEY"}},
                "targets": {name: {"kind": "postgres", "dsn": "postgresql://postgres@127.0.0.1:5432/postgres"}
                            for name in names},
                **({"schedules": {"daily": {"cron": "0 2 * * *"}}} if args.targets > 1 else {}),
                "audit": {"dsn": audit_dsn}}, base_dir=Path(tmp))
            repo = open_repository(policy)
            initialize(repo, create_keyset(policy))  # as `regal-backup init` does
            now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
            end = now - timedelta(days=1)
            events = year_of_events(end) if args.targets == 1 else fleet_events(end, names)
            load(audit_dsn, events)
            trail = AuditTrail(policy, repo)
            period = Period.previous_month(now)

            start = time.monotonic()
            verdict = verify_trail(trail, full=True)
            rows.append((f"audit verify, {verdict.entries:,} entries", time.monotonic() - start,
                         "intact" if verdict.ok else "BROKEN"))
            # The checkpoint a walk at the period's start wrote (the daily `audit verify`, last month's report): the
            # report resumes from it and recomputes every entry of its period.
            last = max(seq for seq, e in enumerate(events, start=1) if e.at < period.start)  # as `load` numbers them
            with psycopg.connect(audit_dsn) as conn:
                head = conn.execute("SELECT hash FROM regal_audit.events WHERE seq = %s", (last,)).fetchone()[0]
            trail.checkpoint(ChainVerdict(True, last, last, head))

            start = time.monotonic()
            for i in range(200):
                trail.append("benchmark", f"r{i}", "success", {"i": i})
            append = (time.monotonic() - start) / 200
            rows.append(("append one event (connect, lock, head, insert)", append, f"{1 / append:,.0f} events/s"))

            start = time.monotonic()
            verdict = verify_trail(trail)
            took = time.monotonic() - start
            trail.checkpoint(verdict)
            resumed = verdict.resumed_from["seq"] if verdict.resumed_from else None
            rows.append((f"audit verify --resume, {verdict.entries:,} entries, resumed from entry {resumed}", took,
                         "intact" if verdict.ok else "BROKEN"))
            start = time.monotonic()
            report = build_report(policy, period, repo=repo, now=now, scope=args.framework)
            took = time.monotonic() - start
            pages = len(PdfReader(io.BytesIO(report.pdf)).pages)
            if args.pdf:
                args.pdf.write_bytes(report.pdf)
            what = f"monthly report {period.label}, {len(names)} target(s), {len(report.frameworks)} framework(s)"
            size = f"{len(report.pdf) / 1e6:.1f} MB PDF, {pages} pages, {len(report.controls)} controls"
            rows.append((what, took, size))
    finally:
        with psycopg.connect(args.dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    print_table(f"audit trail and report ({len(events):,} events of history)", ["step", "wall s", "note"],
                [[step, f"{wall:.3f}", note] for step, wall, note in rows])


if __name__ == "__main__":
    main()
