"""The audit trail and the compliance report, on a real history: real backups of a real PostgreSQL, checks,
a failed backup, restore tests in a scratch server, a drill, a key rotation, an erasure, an alert sent to
a real HTTP receiver. The PDF is rendered by WeasyPrint and read back with pypdf and pdfplumber; PNGs of
page 1 and of the control matrix are kept (REGAL_REPORT_PNG_DIR, default the test's tmp dir)."""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import re
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from regal_dagster.engine.alerts import AlertBook, evaluate_and_notify, rpo_conditions
from regal_dagster.engine.audit import AuditTrail, verify_trail
from regal_dagster.engine.compliance.controls import (
    CONTROLS,
    FAIL,
    NOT_TESTED,
    OUT_OF_SCOPE,
    PASS,
    Control,
    framework_verdict,
    framework_verdicts,
)
from regal_dagster.engine.compliance.evidence import COLUMNS
from regal_dagster.engine.compliance.frameworks.registry import frameworks
from regal_dagster.engine.compliance.report import Period, ReportResult, build_report
from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.documents import seal, unseal
from regal_dagster.engine.errors import RegalError, UsageError
from regal_dagster.engine.policy import load_policy
from regal_dagster.engine.retention import PRUNE_LOG_KIND, run_prune
from regal_dagster.engine.storage import open_repository

from .conftest import DatabaseFactory, load_awkward_data, run_cli, verified_backup, write_policy_file

FRAMEWORKS = {key: framework.name for key, framework in frameworks().items()}
HOSTILE = '<script>alert("pwned")</script><img src="http://127.0.0.1:9/x.png">'


@pytest.fixture
def hook() -> Iterator[list[dict[str, Any]]]:
    """A real HTTP receiver for the webhook alert channel."""
    posts: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    posts.append({"url": f"http://127.0.0.1:{server.server_address[1]}/hook"})
    yield posts
    server.shutdown()


@pytest.fixture
def setup(system_pg: DatabaseFactory, tmp_path: Path, master_key: str, hook: list[dict[str, Any]]) -> dict[str, Any]:
    source = system_pg.create()
    load_awkward_data(source)
    audit_db = system_pg.create("regal_audit")
    policy_file = write_policy_file(
        tmp_path, {"pos": source, "broken": "postgresql://postgres@127.0.0.1:5432/regal_no_such_db"},
        audit={"dsn": audit_db},
        gdpr={"subjects": {"pos": [{"table": "public.customers", "match_column": "email", "action": "delete"}]}},
        alerts={"channels": [{"kind": "webhook", "url": hook[0]["url"], "timeout": "5s"}]})
    document = yaml.safe_load(policy_file.read_text())
    document["targets"]["pos"].update(description=HOSTILE, data_classes=["payment data", "personal data"])
    policy_file.write_text(yaml.safe_dump(document))
    return {"policy_file": policy_file, "audit_db": audit_db, "tmp": tmp_path}


def _history(policy_file: Path) -> dict[str, Any]:
    """Two good backups, checks, a failed backup, an erasure, a restore test, a key rotation, a drill, an
    alert, and a prune (it deletes the first backup: the second fills the same hourly slot)."""
    ids = [verified_backup(policy_file) for _ in range(2)]
    assert run_cli(policy_file, "annotate", ids[0], "superseded", "(INC-7)").returncode == 0  # then pruned
    assert run_cli(policy_file, "pin", ids[1], "--reason", "litigation hold LH-12").returncode == 0
    assert run_cli(policy_file, "backup", "broken").returncode == 1  # cannot connect: a failed backup
    assert run_cli(policy_file, "gdpr", "erase", "pos", "someone@example.test", "--reference", HOSTILE).returncode == 0
    assert run_cli(policy_file, "restore-test", "--target", "pos").returncode == 0
    assert run_cli(policy_file, "keys", "rotate").returncode == 0
    drill = run_cli(policy_file, "drill", "--json")  # `broken` has no backup: the drill fails, as it should
    assert drill.returncode in (0, 3), drill.stderr
    policy = load_policy(policy_file)
    conditions = rpo_conditions(policy, open_repository(policy), load_keyring(policy), datetime.now(UTC))
    failures = evaluate_and_notify(policy, AlertBook(), conditions, datetime.now(UTC))
    assert failures == []
    pruned = run_cli(policy_file, "prune", "--json")
    assert pruned.returncode == 0, pruned.stderr
    return {"backups": ids, "deleted": json.loads(pruned.stdout)["deleted"]}


def _trail(policy_file: Path) -> AuditTrail:
    policy = load_policy(policy_file)
    return AuditTrail(policy, open_repository(policy))


def test_every_operation_is_one_audit_event_with_the_pci_fields(setup: dict[str, Any]) -> None:
    history = _history(setup["policy_file"])
    events = _trail(setup["policy_file"]).events()
    kinds = [e.event_type for e in events]
    for expected in ("policy_change", "backup", "verification", "gdpr_erasure", "restore_test", "key_rotate",
                     "dr_drill", "alert"):
        assert expected in kinds, expected
    backups = [e for e in events if e.event_type == "backup"]
    assert [e.resource for e in backups if e.outcome == "success"] == history["backups"]
    failures = [e for e in backups if e.outcome == "failure"]
    assert len(failures) == 1, [(e.resource, e.details) for e in failures]
    (failed,) = failures
    assert failed.resource.startswith("broken-") and "cannot connect" in json.loads(failed.details)["error"]
    for event in events:  # who, what, when, outcome, where from, resource (PCI DSS 10.2.2)
        assert event.actor.startswith(("user:", "service:")) and event.host and event.process and event.resource
        assert event.at.tzinfo is not None
    assert all("password" not in e.details.lower() and "postgresql://" not in e.details for e in events)

    # Each restore test records where it ran against the source (here the source's own host: not segregated).
    tested = next(e for e in events if e.event_type == "restore_test" and e.outcome == "success")
    where = json.loads(tested.details)["segregation"]
    assert where["same_host_as_source"] is True and where["os_user"] and where["network_namespace"].startswith("net:")
    assert where["host_id"] and "OS account" in where["repository_identity"]
    # Management sign-off through the CLI: an unknown entry and a failed drill are refused (exit 2), audited.
    (drill,) = [e for e in events if e.event_type == "dr_drill"]
    unknown = run_cli(setup["policy_file"], "signoff", "99999", "--by", "Ann Lee", "--role", "CIO")
    assert unknown.returncode == 2 and "entry 99999 is no entry" in unknown.stderr, unknown.stderr
    failed_drill = run_cli(setup["policy_file"], "signoff", str(drill.seq), "--by", "Ann Lee", "--role", "CIO")
    assert failed_drill.returncode == 2 and "is a FAILED drill" in failed_drill.stderr, failed_drill.stderr
    signed = run_cli(setup["policy_file"], "signoff", str(tested.seq), "--by", "Ann Lee", "--role", "CIO",
                     "--note", "reviewed row counts", "--json")
    assert signed.returncode == 0, signed.stderr
    assert json.loads(signed.stdout)["result_id"] == tested.seq
    signoffs = [e for e in _trail(setup["policy_file"]).events() if e.event_type == "signoff"]
    assert [(e.outcome, json.loads(e.details).get("refused")) for e in signoffs] == [
        ("failure", True), ("failure", True), ("success", None)]
    assert json.loads(signoffs[-1].details)["by"] == "Ann Lee" and signoffs[-1].actor.startswith("user:")

    (first_policy,) = [json.loads(e.details) for e in events if e.event_type == "policy_change"]  # many processes
    document = yaml.safe_load(setup["policy_file"].read_text())
    document["rpo"] = "2h"
    setup["policy_file"].write_text(yaml.safe_dump(document))
    assert run_cli(setup["policy_file"], "prune", "--dry-run").returncode == 0
    changes = [json.loads(e.details) for e in _trail(setup["policy_file"]).events() if e.event_type == "policy_change"]
    assert len(changes) == 2 and changes[1]["previous_sha256"] == first_policy["policy_sha256"]

    with psycopg.connect(setup["audit_db"], autocommit=True) as conn:  # the database itself refuses changes
        for statement in ("UPDATE regal_audit.events SET outcome = 'success' WHERE seq = 1",
                          "DELETE FROM regal_audit.events WHERE seq = 1", "TRUNCATE regal_audit.events"):
            with pytest.raises(psycopg.Error, match="append-only"):
                conn.execute(statement)


def test_the_report_figures_equal_the_audit_trail_and_tampering_is_named(setup: dict[str, Any]) -> None:
    policy_file = setup["policy_file"]
    history = _history(policy_file)
    policy = load_policy(policy_file)
    period = Period.parse(f"{datetime.now(UTC):%Y-%m}")
    events = _trail(policy_file).events(period.start, period.end)  # the trail as the report reads it
    result = build_report(policy, period, scope=list(frameworks()))  # every framework in scope

    import pdfplumber
    from pypdf import PdfReader

    pdf_path = setup["tmp"] / "report.pdf"
    pdf_path.write_bytes(result.pdf)
    reader = PdfReader(pdf_path)
    pages = [page.extract_text() for page in reader.pages]
    text = "\n".join(pages)
    backups = [e for e in events if e.event_type == "backup"]
    ok = [e for e in backups if e.outcome == "success"]
    assert f"({len(ok)} of {len(backups)})" in text and f"{len(ok) / len(backups) * 100:.1f}%" in text
    tests = [e for e in events if e.event_type == "restore_test"]
    assert f"{sum(e.outcome == 'success' for e in tests)} of {len(tests)}" in text
    assert "Audit trail verified" in pages[0] and result.chain_ok
    assert result.interim and "INTERIM REPORT" in pages[0]  # this month has not ended

    expected = {"BK-01": "FAIL",  # `broken` never backed up: an unresolved failure
                "BK-02": "FAIL",
                "TI-01": "NOT TESTED",  # this policy gives its targets no criticality tier
                "VR-01": "PASS", "EN-01": "PASS",
                "EN-02": "PASS",  # every connection stays on this host (loopback, local files)
                "KM-01": "PASS", "RD-01": "PASS",  # the prune deleted the backup its plan said to
                "MD-01": "FAIL",  # no off-site copy in this policy
                "RT-01": "PASS", "DR-01": "FAIL",
                "SO-01": "NOT TESTED",  # the restore test is not signed off yet, and not yet due
                "SG-01": "FAIL",  # restore-tested on the source's own host
                "IM-01": "FAIL",  # a local repository locks nothing
                "AU-01": "PASS",
                "AU-02": "NOT TESTED",  # intact, but the first report: no checkpoint outside the database yet
                "AU-03": "PASS",
                "AL-01": "PASS",  # the failure of `broken` was followed by an alert about it
                "GD-01": "PASS"}
    assert {c.control_id: c.result for c in result.controls} == expected
    assert history["deleted"] == history["backups"][:1]
    assert result.frameworks == {name: "FAIL" for name in FRAMEWORKS.values()}  # BK-01 fails each of them
    # Each requirement under its framework's own identifier, never broken across lines; so are control ids.
    flat = text.replace("\n", " ")
    for cited in ("HIPAA 164.308(a)(7)(ii)(C)", "DORA Art. 12(3)", "(EU) 2024/2690 4.2.2", "SOC 2 A1.2",
                  "ISO/IEC 27001:2022 8.13", "NIST SP 800-53 CP-9(8)"):
        assert cited in flat, cited
    assert not re.search(r"\b[A-Z]{2}-\n\d|\d{3}\.\d{3}(?:\(\w+\))*\n\((?!EU\))|Art\.\n12|CP-\d+\n\((?!EU\))", text)
    assert re.search(r"In operation since \d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC", pages[0])
    assert "NOT SIGNED" in pages[0] and re.search(r"\d+ day\(s\) not in operation", pages[0])
    assert [e["control_id"] for e in result.exceptions] == [k for k, v in expected.items() if v != "PASS"]
    assert all(e["owner"] and e["action"] and re.fullmatch(r"\d{4}-\d{2}-\d{2}", e["due"])
               for e in result.exceptions)

    with pdfplumber.open(pdf_path) as pdf:
        tables = [row for page in pdf.pages for table in page.extract_tables() for row in table]

        def page_with(words: str) -> int:
            return next(i for i, text in enumerate(pages) if words in text)

        _keep_png(pdf_path, {"report-page-1.png": 0, "report-control-matrix.png": page_with("EN-02"),
                             "report-requirements.png": page_with("Requirements of the frameworks in scope"),
                             "report-requirements-2.png": page_with("NIST SP 800-53 CP-9(1)"),
                             "report-schedule-adherence.png": page_with("Schedule adherence"),
                             "report-repositories.png": page_with("Repositories and immutability"),
                             "report-tiers.png": page_with("Criticality tiers"),
                             "report-signoff-segregation.png": page_with("Management sign-off of restore"),
                             "report-exceptions.png": page_with("4. Exceptions and remediation"),
                             "report-charts.png": page_with("Backup duration"),
                             "report-legal-holds.png": page_with("Legal holds and annotations")}, setup["tmp"])
    # Legal holds and annotations, from the audit trail: the pin in force, the annotation of a pruned backup
    holds = [row for row in tables if len(row) == 5 and row[0] and "".join(row[0].split()) in history["backups"]]
    # (rows in backup id order: two backups of the same second sort by their random suffix)
    assert sorted(("".join(r[0].split()), r[1], (r[2] or "").replace("\n", " "), (r[4] or "").replace("\n", " "))
                  for r in holds) == sorted([(history["backups"][0], "none", "", "superseded (INC-7)"),
                                             (history["backups"][1], "in force", "litigation hold LH-12", "")])
    matrix = [row for row in tables if len(row) == 5 and row[0] and re.match(r"[A-Z]{2}-\d{2}\b", row[0])]
    assert {row[0][:5]: row[3].replace("\n", " ") for row in matrix} == expected
    assert "PCI DSS 3.7.4" in " ".join(row[0].replace("\n", " ") for row in matrix)
    exception_rows = [row for row in tables if len(row) == 7 and row[0] and row[0].isdigit() and row[1]
                      and re.fullmatch(r"[A-Z]{2}-\d{2}", row[1])]
    # One list of exceptions, counted the same on the cover, in the summary and in its section.
    on_cover = re.search(r"Exceptions (\d+) \(section 4\)", pages[0])
    in_summary = re.search(r"^Exceptions (\d+) 0$", text, re.MULTILINE)
    in_section = re.search(r"^(\d+) exception\(s\): every control that did not pass", text, re.MULTILINE)
    assert on_cover and in_summary and in_section
    counts = {len(exception_rows), int(on_cover[1]), int(in_summary[1]), int(in_section[1])}
    assert counts == {len(result.exceptions)}

    attachments = reader.attachments
    assert {"backups.csv", "audit_events.csv", "restore_tests.csv", "evidence.json",
            "assessment-results.json", "component-definition.json", "prune_logs.csv", "transport.csv",
            "schedule_adherence.csv", "coverage.csv", "tiers.csv", "signoffs.csv"} <= set(attachments)
    (evidence_json,) = attachments["evidence.json"]
    # The cover's hash is `sha256sum evidence.json` of the attached file, byte for byte.
    assert hashlib.sha256(evidence_json).hexdigest() == result.evidence_sha256
    assert result.evidence_sha256 in "".join(pages[0].split())
    assert "pdfdetach -savefile evidence.json" in text and "sha256sum evidence.json" in text
    evidence = json.loads(evidence_json)
    assert [e["seq"] for e in evidence["audit_events"]] == [e.seq for e in events]
    for name, (body,) in attachments.items():  # every CSV has its header row, empty or not
        if name.endswith(".csv"):
            header = next(csv.reader(io.StringIO(body.decode())))
            assert header and header[0] not in ("", "(no rows)"), name
    assert evidence["erasures"] and not evidence["restores"]  # a table with rows, and one without
    assert sorted((r["backup_id"], r["hold"] or "", r["reason"] or "", r["until"] or "", r["annotation"] or "")
                  for r in evidence["legal_holds"]) == sorted([
        (history["backups"][0], "", "", "", "superseded (INC-7)"),
        (history["backups"][1], "in force", "litigation hold LH-12", "", "")])
    (restores_csv,) = attachments["restores.csv"]
    assert restores_csv.decode().splitlines() == [",".join(COLUMNS["restores"])]

    assert "/GTS_PDFA1" in str(reader.trailer["/Root"].get("/OutputIntents"))  # the PDF/A output intent
    assert reader.metadata is not None
    assert "".join(HOSTILE.split()) in "".join(text.split())  # rendered as text, not markup
    _assert_written_for_people(text)
    assert result.refused_urls == []  # escaped: the <img> was never a tag, so nothing was even asked for

    repo = open_repository(policy)
    assert repo.get_bytes(result.key) == result.pdf
    assert repo.get_bytes(result.key + ".sha256").decode().startswith(result.sha256)
    # The OSCAL results: beside the PDF and attached to it, identifiers derived from the evidence hash.
    assert repo.get_bytes(result.oscal_key) == result.oscal == attachments["assessment-results.json"][0]
    _check_oscal(result, setup["tmp"])

    # A superuser edits one row behind the triggers' back: `audit verify` (every entry recomputed) names it; the next
    # report says so. `--resume` recomputes from the report's checkpoint (after the edited entry) on and says so:
    # it checks only the links and the checkpoints of those before it (faster, and weaker: documented).
    target_seq = next(e.seq for e in events if e.event_type == "verification")
    with psycopg.connect(setup["audit_db"], autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("UPDATE regal_audit.events SET outcome = 'success', details = '{}' WHERE seq = %s", [target_seq])
    resumed = run_cli(policy_file, "audit", "verify", "--resume", "--json")
    assert json.loads(resumed.stdout)["resumed_from_seq"] > target_seq
    verified = run_cli(policy_file, "audit", "verify")
    assert verified.returncode == 3 and f"entry {target_seq}" in verified.stdout and "was edited" in verified.stdout
    broken = build_report(policy, period)
    assert not broken.chain_ok and next(c for c in broken.controls if c.control_id == "AU-02").result == "FAIL"
    cover = PdfReader(io.BytesIO(broken.pdf)).pages[0].extract_text()
    assert "AUDIT TRAIL BROKEN" in cover and f"entry {target_seq}" in cover


def _check_oscal(result: ReportResult, tmp: Path) -> None:
    """The OSCAL Assessment Results load with compliance-trestle's models and say what the PDF says."""
    from trestle.oscal.assessment_results import AssessmentResults

    path = tmp / f"{result.report_id}.oscal-ar.json"
    path.write_bytes(result.oscal)
    document = AssessmentResults.oscal_read(path)
    assert document is not None
    root = uuid.uuid5(uuid.NAMESPACE_URL, f"urn:regal-backup:evidence:{result.evidence_sha256}")
    assert str(document.uuid) == str(uuid.uuid5(root, "assessment-results"))
    (results,) = document.results
    findings = {f.target.target_id.removesuffix("_obj"): f for f in results.findings or []}
    assert {k: f.target.status.state.value for k, f in findings.items()} == {
        c.control_id: "satisfied" if c.result == "PASS" else "not-satisfied" for c in result.controls}
    reasons = {k: getattr(f.target.status.reason, "value", f.target.status.reason)
               for k, f in findings.items()}
    assert {k for k, reason in reasons.items() if reason == "other"} == {
        c.control_id for c in result.controls if c.result == "NOT TESTED"}
    owners = {k: p.value for k, f in findings.items() for p in f.props or [] if p.name == "exception-owner"}
    assert owners == {e["control_id"]: e["owner"] for e in result.exceptions}
    (evidence,) = [r for r in document.back_matter.resources if r.title == "evidence.json"]
    assert evidence.rlinks[0].hashes[0].value == result.evidence_sha256
    observations = {str(o.uuid) for o in results.observations or []}
    assert all(str(r.observation_uuid) in observations
               for f in findings.values() for r in f.related_observations or [])


def _keep_png(pdf_path: Path, pages: dict[str, int], tmp: Path) -> None:
    """Pages as PNGs for a person to look at (REGAL_REPORT_PNG_DIR keeps them, e.g. reports/examples/)."""
    import pypdfium2 as pdfium

    out = Path(os.environ.get("REGAL_REPORT_PNG_DIR", tmp))
    out.mkdir(parents=True, exist_ok=True)
    document = pdfium.PdfDocument(str(pdf_path))
    for name, index in pages.items():
        image = document[index].render(scale=1.5).to_pil()
        image.save(out / name)
        darkest, lightest = image.convert("L").getextrema()
        assert image.size[0] > 800 and lightest - darkest > 100  # a page with something on it, not blank


def test_deleted_inserted_and_reordered_entries_are_named(setup: dict[str, Any]) -> None:
    policy_file = setup["policy_file"]
    trail = _trail(policy_file)
    trail.ensure_schema()
    for i in range(6):
        trail.append("test_event", f"resource-{i}", "success", {"i": i})
    intact = verify_trail(trail)
    assert intact.ok
    trail.checkpoint(intact)
    with psycopg.connect(setup["audit_db"], autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("DELETE FROM regal_audit.events WHERE seq = 3")
    verdict = verify_trail(trail)
    assert not verdict.ok and verdict.first_bad_seq == 3 and "deleted" in (verdict.problem or "")
    with psycopg.connect(setup["audit_db"], autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("INSERT INTO regal_audit.events SELECT 3, at, actor, event_type, outcome, host, process, run_id, "
                     "'forged', details, prev_hash, hash FROM regal_audit.events WHERE seq = 4")
    verdict = verify_trail(trail)
    assert not verdict.ok and verdict.first_bad_seq == 3  # inserted: does not follow entry 2
    with psycopg.connect(setup["audit_db"], autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("DELETE FROM regal_audit.events WHERE seq >= 3")  # the tail goes: only the checkpoint knows
    verdict = verify_trail(trail)
    assert not verdict.ok and "checkpointed" in (verdict.problem or "")


def test_events_wait_in_the_repository_when_the_audit_database_is_down(setup: dict[str, Any],
                                                                        system_pg: DatabaseFactory) -> None:
    policy_file = setup["policy_file"]
    trail = _trail(policy_file)
    trail.ensure_schema()
    trail.append("first", "r1", "success", {})
    down = load_policy(policy_file).model_copy(update={"audit": load_policy(policy_file).audit.model_copy(  # type: ignore[union-attr]
        update={"dsn": "postgresql://postgres@127.0.0.1:9/regal_audit"})})
    with pytest.raises(RegalError, match="cannot reach the audit database"):
        AuditTrail(down, trail.repo).append("while_down", "r2", "success", {"n": 1})
    assert verify_trail(trail).spooled == 1
    trail.append("after", "r3", "success", {})
    events = trail.events()
    assert [e.event_type for e in events][-3:] == ["first", "while_down", "after"] or \
        [e.event_type for e in events if e.event_type in ("first", "while_down", "after")] == \
        ["first", "while_down", "after"]
    assert json.loads(next(e for e in events if e.event_type == "while_down").details)["spooled"] is True
    assert verify_trail(trail).ok and verify_trail(trail).spooled == 0


def _self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Regal Backup compliance (test)")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now.replace(year=now.year + 1))
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "signing.pem", directory / "signing.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    return cert_file, key_file


def test_the_report_is_signed_when_the_policy_gives_a_certificate_and_dagster_builds_it(
        setup: dict[str, Any]) -> None:
    import dagster as dg
    from pyhanko.keys import load_cert_from_pemder
    from pyhanko.pdf_utils.reader import PdfFileReader
    from pyhanko.sign.validation import validate_pdf_signature
    from pyhanko_certvalidator import ValidationContext

    from regal_dagster.defs import build_definitions

    policy_file = setup["policy_file"]
    cert_file, key_file = _self_signed(setup["tmp"])
    document = yaml.safe_load(policy_file.read_text())
    document["reports"] = {"signing": {"cert_file": str(cert_file), "key_file": str(key_file)}}
    policy_file.write_text(yaml.safe_dump(document))
    assert run_cli(policy_file, "backup", "pos").returncode == 0

    defs = build_definitions(str(policy_file))
    assert defs.resolve_schedule_def("monthly_compliance_report").cron_schedule == "0 7 1 * *"
    period = f"{datetime.now(UTC):%Y-%m}"
    result = defs.resolve_job_def("compliance_report_job").execute_in_process(
        instance=dg.DagsterInstance.ephemeral(),
        run_config={"ops": {"compliance__report": {"config": {"period": period}}}})
    assert result.success
    (materialization,) = result.asset_materializations_for_node("compliance__report")
    metadata = materialization.metadata
    repo = open_repository(load_policy(policy_file))
    pdf = repo.get_bytes(str(metadata["repository_key"].value))
    assert __import__("hashlib").sha256(pdf).hexdigest() == metadata["sha256"].value

    (signature,) = PdfFileReader(__import__("io").BytesIO(pdf)).embedded_signatures
    status = validate_pdf_signature(signature, ValidationContext(trust_roots=[load_cert_from_pemder(str(cert_file))]))
    assert status.intact and status.valid and status.trusted
    events = _trail(policy_file).events()
    assert any(e.event_type == "report_generated" and e.run_id == result.run_id for e in events)


def test_the_renderer_fetches_only_its_own_template_files() -> None:
    from regal_dagster.engine.compliance.rendering import TEMPLATES, _fetcher

    fetcher = _fetcher()
    response = fetcher.fetch((TEMPLATES / "report.css").as_uri())  # its own stylesheet: allowed
    assert b"@page" in response.read()
    response.close()
    for url in ("http://127.0.0.1:9/tracker.png", "file:///etc/passwd", (TEMPLATES / ".." / "pyproject.toml").as_uri()):
        with pytest.raises(ValueError, match="fetches only its own template files"):
            fetcher.fetch(url)
    assert len(fetcher.refused) == 3


def test_a_drill_run_requests_the_report_of_its_quarter(setup: dict[str, Any]) -> None:
    import dagster as dg

    from regal_dagster.defs import build_definitions

    defs = build_definitions(str(setup["policy_file"]))
    instance = dg.DagsterInstance.ephemeral()
    drill = defs.resolve_job_def("dr_drill_job").execute_in_process(instance=instance, raise_on_error=False)
    assert not drill.success  # no target has a backup yet: the drill fails, and that is worth a report too
    (failure,) = [e for e in drill.all_events if e.event_type == dg.DagsterEventType.RUN_FAILURE]
    sensor = defs.resolve_sensor_def("report_after_drill_failure")
    request = sensor(dg.build_run_status_sensor_context(
        sensor_name=sensor.name, dagster_event=failure, dagster_instance=instance, dagster_run=drill.dagster_run))
    quarter = Period.quarter_of(datetime.now(UTC)).label
    assert request.run_config == {"ops": {"compliance__report": {"config": {"period": quarter}}}}
    assert request.run_key == f"after-drill-{drill.run_id}"
    assert sensor.job_name == "compliance_report_job"  # type: ignore[attr-defined]


def test_a_framework_passes_only_when_every_control_mapped_to_it_passes() -> None:
    rank = {PASS: 0, NOT_TESTED: 1, FAIL: 2}  # the worst result decides
    assert framework_verdict([OUT_OF_SCOPE] * 3) == OUT_OF_SCOPE  # a period before the policy existed
    for size in range(7):
        for results in itertools.product(list(rank), repeat=size):
            verdict = framework_verdict(results)
            assert verdict == (max(results, key=rank.__getitem__) if results else NOT_TESTED)
            assert (verdict == PASS) == (bool(results) and set(results) == {PASS})

    # Every combination of results of the controls mapped to each framework (the others FAIL, to show they
    # do not count), through the matrix as the report builds it.
    matrix = [Control(spec.control_id, list(spec.mapping), spec.description, spec.frequency, spec.test, PASS,
                      "", spec.evidence) for spec, _ in CONTROLS]
    combinations = 0
    original = ["pci", "sox", "gdpr"]  # (tests/test_compliance_rules.py judges the others requirement by requirement)
    for prefix, name in FRAMEWORKS.items():
        if prefix not in original:
            continue
        mapped = [c for c in matrix if prefix in c.frameworks]
        assert mapped, name
        for c in matrix:
            c.result = FAIL if c not in mapped else PASS
        for results in itertools.product(list(rank), repeat=len(mapped)):
            for control, result in zip(mapped, results, strict=True):
                control.result = result
            assert framework_verdicts(matrix, [prefix])[name] == framework_verdict(results)
            combinations += 1
    assert combinations == sum(3 ** sum(p in c.frameworks for c in matrix) for p in original)
    for c in matrix:
        c.result = PASS
    next(c for c in matrix if c.control_id == "RT-01").result = NOT_TESTED  # no restore test in the month
    assert framework_verdicts(matrix, original) == {"PCI DSS 4.0.1": PASS, "SOX ITGC": NOT_TESTED,
                                                    "GDPR": NOT_TESTED}


def test_a_future_period_is_refused(setup: dict[str, Any]) -> None:
    policy_file = setup["policy_file"]
    future = f"{datetime.now(UTC).year + 1}-01"
    refused = run_cli(policy_file, "report", "--period", future)
    assert refused.returncode == 2 and f"the period {future} has not begun" in refused.stderr  # bad usage
    assert run_cli(policy_file, "report", "--period", "2026-13").returncode == 2
    with pytest.raises(UsageError, match="has not begun"):
        build_report(load_policy(policy_file), Period.parse(f"{datetime.now(UTC).year + 1}-Q1"))
    repo = open_repository(load_policy(policy_file))
    assert not list(repo.list("compliance-reports/"))  # nothing stored as evidence
    trail = _trail(policy_file)
    trail.ensure_schema()
    assert not [e for e in trail.events() if e.event_type == "report_generated"]


def test_a_past_month_is_judged_on_its_own_evidence(setup: dict[str, Any]) -> None:
    """No backup in the month fails BK-01; retention is judged at the month's end from its prune log (which
    the audit trail vouches for), not on today's repository; the report records nothing it then counts."""
    policy_file = setup["policy_file"]
    policy = load_policy(policy_file)
    repo = open_repository(policy)
    now = datetime.now(UTC)
    month = Period.previous_month(now)
    # The system went into operation today: last month predates it, out of scope. Say it existed then.
    _trail(policy_file).append("policy_change", "policy", "success", {"policy_sha256": "earlier"},
                               at=month.start - timedelta(days=1))
    pruned = run_prune(policy, repo, month.end - timedelta(hours=21, minutes=30))  # the 02:30 schedule
    assert pruned.deleted == []
    for _ in range(2):  # today: two backups in one hourly slot, so the older one is due for deletion
        verified_backup(policy_file)
    # Two days on, with the prunes in between missed, it is past its retention: a retention check failure,
    # recorded (issue 18: only once the prune that should have deleted it has run and left it).
    assert run_prune(policy, repo, now + timedelta(days=2), dry_run=True).past_retention

    report = build_report(policy, month)
    results = {c.control_id: c for c in report.controls}
    assert not report.interim
    assert results["BK-01"].result == FAIL and re.search(r"missed: broken \d+ \(first .*\), pos \d+",
                                                         results["BK-01"].finding)
    assert results["BK-02"].result == FAIL and results["VR-01"].result == NOT_TESTED
    assert results["RD-01"].result == PASS, results["RD-01"].finding  # October's end, not today's repository
    assert report.frameworks["SOX ITGC"] == FAIL
    assert {e["control_id"] for e in report.exceptions} == {c.control_id for c in report.controls
                                                            if c.result != PASS}

    this_month = build_report(policy, Period.parse(f"{now:%Y-%m}"))
    again = build_report(policy, Period.parse(f"{now:%Y-%m}"))
    this = {c.control_id: c for c in this_month.controls}
    assert this["RD-01"].result == FAIL and "no prune ran in the period" in this["RD-01"].finding
    # The retention check's failure is not a failed operation, and the reports recorded nothing it counts.
    assert "0 failed operation(s) in the period" in this["AL-01"].finding
    assert {c.control_id: c.finding for c in again.controls}["AL-01"] == this["AL-01"].finding
    kinds = [e.event_type for e in _trail(policy_file).events()]
    assert kinds.count("retention_check") == 1 and kinds.count("report_generated") == 3

    (log_key,) = [s.key for s in repo.list("prune/")]
    original = repo.get_bytes(log_key)
    keyring = load_keyring(policy)
    body = unseal(keyring, PRUNE_LOG_KIND, log_key, original)
    repo.put_bytes(log_key, seal(keyring, PRUNE_LOG_KIND, log_key, body))  # the same content, encrypted again:
    # it authenticates, but it is not the file the prune wrote
    rewritten = {c.control_id: c for c in build_report(policy, month).controls}["RD-01"]
    assert rewritten.result == FAIL and "differs from the SHA-256 the audit trail recorded" in rewritten.finding
    edited_bytes = bytearray(original)  # someone edits the log after the fact (without the keys: its ciphertext)
    edited_bytes[len(edited_bytes) // 2] ^= 0x01
    repo.put_bytes(log_key, bytes(edited_bytes))
    edited = {c.control_id: c for c in build_report(policy, month).controls}["RD-01"]
    assert edited.result == FAIL and "fails authentication" in edited.finding


LONG = "point_of_sale_transactions_and_loyalty_ledger_eu_west_"  # 54 characters: names near the limit of 63


def test_the_report_fits_its_pages_with_many_targets_rotated_keys_and_long_identifiers(
        system_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> None:
    import pdfplumber

    from regal_dagster.engine.backup import run_backup
    from regal_dagster.engine.checks import run_checks
    from regal_dagster.engine.crypto import load_keyring
    from regal_dagster.engine.keys import retire_key, rotate_key

    source = system_pg.create()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE receipts (id int PRIMARY KEY, total numeric); "
                     "INSERT INTO receipts SELECT g, g * 1.5 FROM generate_series(1, 50) g")
    names = [f"{LONG}{i:02d}" for i in range(12)]
    policy_file = write_policy_file(tmp_path, {**dict.fromkeys(names, source),
                                               f"{LONG}down": "postgresql://postgres@127.0.0.1:9/none"},
                                    audit={"dsn": system_pg.create("regal_audit")})
    policy = load_policy(policy_file)
    repo = open_repository(policy)
    first = load_keyring(policy).primary_key_id
    rotate_key(policy)
    retire_key(policy, first)  # nothing used it yet
    for index, name in enumerate(names):
        if index == 6:
            rotate_key(policy)  # half the backups under each of two keys
        manifest = run_backup(policy, name, "daily", repo=repo).manifest
        assert run_checks(policy, repo, load_keyring(policy), manifest.backup_id).passed
    with pytest.raises(RegalError):
        run_backup(policy, f"{LONG}down", repo=repo)

    result = build_report(policy, Period.parse(f"{datetime.now(UTC):%Y-%m}"))
    pdf_path = tmp_path / "many.pdf"
    pdf_path.write_bytes(result.pdf)
    mm = 72 / 25.4
    cells: list[str] = []
    with pdfplumber.open(pdf_path) as pdf:
        texts = [page.extract_text() or "" for page in pdf.pages]
        for number, page in enumerate(pdf.pages, start=1):
            assert page.chars, number
            left, right = 16 * mm - 0.5, page.width - 16 * mm + 0.5
            outside = [c["text"] for c in page.chars if c["x0"] < left or c["x1"] > right
                       or c["top"] < 5 * mm or c["bottom"] > page.height - 5 * mm]
            assert not outside, f"page {number}: {''.join(outside)[:80]}"  # inside the page's margins
            words = page.extract_words()
            for table in page.find_tables():
                for row in table.rows:
                    borders = {x for cell in row.cells if cell for x in (cell[0], cell[2])}
                    top, bottom = row.bbox[1], row.bbox[3]
                    crossing = [w["text"] for w in words if top < (w["top"] + w["bottom"]) / 2 < bottom
                                and any(w["x0"] < x - 1 and w["x1"] > x + 1 for x in borders)]
                    assert not crossing, f"page {number}: {crossing} run over a cell's border"
                cells += ["".join((cell or "").split()) for row in table.extract() for cell in row]
            lowest = max(c["bottom"] for c in page.chars if c["bottom"] < page.height - 20 * mm)
            if 1 < number < len(pdf.pages):  # sections flow: no page left half empty
                assert lowest > page.height * 0.6, f"page {number} ends at {lowest / page.height:.0%}"
        keys_page = next(i for i, text in enumerate(texts) if "Key inventory" in text)
        _keep_png(pdf_path, {"report-many-targets-scope.png": 1, "report-many-targets-keys.png": keys_page},
                  tmp_path)
    failed = [e.resource for e in _trail(policy_file).events() if e.outcome == "failure"]
    for identifier in [*names, *failed]:
        assert any(identifier in cell for cell in cells), identifier  # wrapped inside its cell, never cut off
    keys = {k["key_id"]: k["status"] for k in json.loads(_attachment(result.pdf, "evidence.json"))["keys"]}
    assert sorted(keys.values()) == ["decrypt-only", "primary", "retired"]
    _assert_written_for_people("\n".join(texts))


def _assert_written_for_people(text: str) -> None:
    """No label or date broken inside a word, no Python leaking through (1:00:00, {}, 1.44e+04)."""
    for word in ("success", "failure", "verification", "rotation", "retirement", "decrypt-only", "primary",
                 "retired", "policy change", "restore test", "loopback", "hourly", "daily", "UNRESOLVED"):
        for cut in range(1, len(word)):
            assert f"{word[:cut]}\n{word[cut:]}" not in text, word
    assert not re.search(r"\d{4}-\d{2}-\d?\n\d|\d{4}-\d?\n\d|\d{2}:\d?\n\d", text)  # dates, times whole
    assert "1:00:00" not in text and "{}" not in text and not re.search(r"\de[+-]\d", text)


def _attachment(pdf: bytes, name: str) -> bytes:
    from pypdf import PdfReader

    (body,) = PdfReader(io.BytesIO(pdf)).attachments[name]
    return body


def test_encryption_in_transit_is_read_from_each_connection_as_configured(tmp_path: Path) -> None:
    from regal_dagster.engine.compliance.controls import Facts, _encrypted_in_transit
    from regal_dagster.engine.compliance.evidence import Evidence
    from regal_dagster.engine.policy import policy_from_dict

    def transports(repository: dict[str, Any], **targets: dict[str, Any]) -> dict[str, tuple[str, str]]:
        policy = policy_from_dict({
            "repository": repository, "encryption": {"keyset": "k.json", "master_key": {"env": "UNUSED"}},
            "targets": targets, "audit": {"dsn": "postgresql://audit@audit.internal/audit?sslmode=verify-full"}},
            base_dir=tmp_path)
        found = policy.transports()
        assert not any("s3cret" in t.connection or "s3cret" in t.how for t in found)  # never a password
        verdict = _encrypted_in_transit(Facts(policy, Evidence({"transport": [t.to_json() for t in found]}), {}, [],
                                              None, Period.parse("2026-11"), datetime.now(UTC)))  # type: ignore[arg-type]
        return {"EN-02": (verdict.result, verdict.finding), **{t.connection.split(" (")[0].split(":")[0]:
                                                                (t.protection, t.how) for t in found}}

    exposed = transports({"url": "s3://backups/pos", "endpoint_url": "http://minio.internal:9000"},
                         pos={"kind": "postgres", "dsn": "postgresql://backup:s3cret@db.internal:5432/pos"},
                         cache={"kind": "redis", "url": "redis://:s3cret@cache.internal:6379"},
                         sock={"kind": "postgres", "dsn": "dbname=pos"})
    assert exposed["repository"] == ("none", "http:// (not encrypted)")
    assert exposed["target pos"][0] == "none" and "sslmode not set" in exposed["target pos"][1]
    assert exposed["target cache"][0] == "none" and exposed["target sock"] == ("local", "Unix socket")
    assert exposed["audit trail database"] == ("TLS", "sslmode=verify-full (server verified)")
    result, finding = exposed["EN-02"]
    assert result == FAIL and "not encrypted: repository" in finding and "target pos" in finding

    encrypted = transports({"url": "s3://backups/pos"},  # AWS S3: the SDK's default is https
                           pos={"kind": "postgres", "dsn": "postgresql://backup@db.internal/pos?sslmode=require"},
                           cache={"kind": "redis", "url": "rediss://cache.internal:6380"},
                           tf={"kind": "terraform", "state": "s3://states/pos.tfstate"})
    assert encrypted["EN-02"][0] == PASS and "not encrypted: none" in encrypted["EN-02"][1]
    assert encrypted["target pos"] == ("TLS", "sslmode=require (server certificate not verified)")
