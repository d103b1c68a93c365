"""The audit trail and the compliance report, on a real history: real backups of a real PostgreSQL, checks,
a failed backup, restore tests in a scratch server, a drill, a key rotation, an erasure, an alert sent to
a real HTTP receiver. The PDF is rendered by WeasyPrint and read back with pypdf and pdfplumber; PNGs of
page 1 and of the control matrix are kept (REGAL_REPORT_PNG_DIR, default the test's tmp dir)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from regal_dagster.engine.alerts import AlertBook, evaluate_and_notify, rpo_conditions
from regal_dagster.engine.audit import AuditTrail, verify_trail
from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.errors import RegalError
from regal_dagster.engine.policy import load_policy
from regal_dagster.engine.report import Period, build_report
from regal_dagster.engine.storage import open_repository

from .conftest import DatabaseFactory, load_awkward_data, run_cli, verified_backup, write_policy_file

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
    """Two good backups, checks, a failed backup, a restore test, an erasure, a key rotation, a drill, an alert."""
    ids = [verified_backup(policy_file) for _ in range(2)]
    assert run_cli(policy_file, "backup", "broken").returncode == 1  # cannot connect: a failed backup
    assert run_cli(policy_file, "gdpr", "erase", "pos", "someone@example.test", "--reference", HOSTILE).returncode == 0
    assert run_cli(policy_file, "restore-test", "--target", "pos").returncode == 0
    assert run_cli(policy_file, "keys", "rotate").returncode == 0
    drill = run_cli(policy_file, "drill", "--json")  # `broken` has no backup: the drill fails, as it should
    assert drill.returncode in (0, 3), drill.stderr
    policy = load_policy(policy_file)
    failures = evaluate_and_notify(policy, AlertBook(), rpo_conditions(policy, open_repository(policy), load_keyring(policy),
                                                                       datetime.now(UTC)), datetime.now(UTC))
    assert failures == []
    return {"backups": ids}


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
    (failed,) = [e for e in backups if e.outcome == "failure"]
    assert failed.resource.startswith("broken-") and "cannot connect" in json.loads(failed.details)["error"]
    for event in events:  # who, what, when, outcome, where from, resource (PCI DSS 10.2.2)
        assert event.actor.startswith(("user:", "service:")) and event.host and event.process and event.resource
        assert event.at.tzinfo is not None
    assert all("password" not in e.details.lower() and "postgresql://" not in e.details for e in events)

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
    _history(policy_file)
    policy = load_policy(policy_file)
    period = Period.parse(f"{datetime.now(UTC):%Y-%m}")
    events = _trail(policy_file).events(period.start, period.end)  # the trail as the report reads it
    result = build_report(policy, period)

    import pdfplumber
    from pypdf import PdfReader

    pdf_path = setup["tmp"] / "report.pdf"
    pdf_path.write_bytes(result.pdf)
    reader = PdfReader(pdf_path)
    text = "\n".join(page.extract_text() for page in reader.pages)
    backups = [e for e in events if e.event_type == "backup"]
    ok = [e for e in backups if e.outcome == "success"]
    assert f"({len(ok)} of {len(backups)})" in text and f"{len(ok) / len(backups) * 100:.1f}%" in text
    tests = [e for e in events if e.event_type == "restore_test"]
    assert f"{sum(e.outcome == 'success' for e in tests)} of {len(tests)}" in text
    assert "Audit trail verified" in text and result.chain_ok

    expected = {"BK-01": "FAIL",  # `broken` never backed up: an open failure
                "VR-01": "PASS", "EN-01": "PASS", "KM-01": "PASS", "RD-01": "FAIL",  # two backups in an hour
                "MD-01": "FAIL",  # no off-site copy in this policy
                "RT-01": "PASS", "DR-01": "FAIL", "AU-01": "PASS", "AU-02": "PASS", "AU-03": "PASS",
                "AL-01": "PASS", "GD-01": "PASS"}
    assert {c.control_id: c.result for c in result.controls if c.control_id in expected} == expected
    with pdfplumber.open(pdf_path) as pdf:
        matrix_page = next(i for i, p in enumerate(pdf.pages) if "4. Control matrix" in (p.extract_text() or ""))
        rows = [row for page in pdf.pages[matrix_page:matrix_page + 6] for table in page.extract_tables()
                for row in table if row and row[0] and row[0][:3] in ("BK-", "VR-", "EN-", "KM-", "RD-", "MD-",
                                                                     "RT-", "DR-", "AU-", "AL-", "GD-")]
        assert {row[0]: row[5] for row in rows} == {c.control_id: c.result for c in result.controls}
        assert "PCI DSS\n3.7.4" in "\n".join(row[1] for row in rows) or "PCI DSS 3.7.4" in " ".join(
            row[1].replace("\n", " ") for row in rows)
        _keep_png(pdf_path, [0, matrix_page], setup["tmp"])

    attachments = reader.attachments
    assert {"backups.csv", "audit_events.csv", "restore_tests.csv", "evidence.json"} <= set(attachments)
    evidence = json.loads(attachments["evidence.json"][0])
    assert len(evidence["audit_events"]) == len(events)
    assert "/GTS_PDFA1" in str(reader.trailer["/Root"].get("/OutputIntents"))  # the PDF/A output intent
    assert reader.metadata is not None
    assert "".join(HOSTILE.split()) in "".join(text.split())  # rendered as text, not markup
    assert result.refused_urls == []  # escaped: the <img> was never a tag, so nothing was even asked for

    repo = open_repository(policy)
    assert repo.get_bytes(result.key) == result.pdf
    assert repo.get_bytes(result.key + ".sha256").decode().startswith(result.sha256)

    # A superuser edits one row behind the triggers' back: `audit verify` names it; the next report says so.
    target_seq = next(e.seq for e in events if e.event_type == "verification")
    with psycopg.connect(setup["audit_db"], autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("UPDATE regal_audit.events SET outcome = 'success', details = '{}' WHERE seq = %s", [target_seq])
    verified = run_cli(policy_file, "audit", "verify")
    assert verified.returncode == 3 and f"entry {target_seq}" in verified.stdout and "was edited" in verified.stdout
    broken = build_report(policy, period)
    assert not broken.chain_ok and next(c for c in broken.controls if c.control_id == "AU-02").result == "FAIL"
    cover = PdfReader(__import__("io").BytesIO(broken.pdf)).pages[0].extract_text()
    assert "AUDIT TRAIL BROKEN" in cover and f"entry {target_seq}" in cover


def _keep_png(pdf_path: Path, pages: list[int], tmp: Path) -> None:
    """Page 1 and the control matrix as PNGs for a person to look at."""
    import pypdfium2 as pdfium

    out = Path(os.environ.get("REGAL_REPORT_PNG_DIR", tmp))
    out.mkdir(parents=True, exist_ok=True)
    document = pdfium.PdfDocument(str(pdf_path))
    for index, name in zip(pages, ["report-page-1.png", "report-control-matrix.png"], strict=True):
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
    from regal_dagster.engine.report import TEMPLATES, _fetcher

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
