"""Alerts end to end, against real peers: an SMTP server (aiosmtpd, STARTTLS or SSL with a self-signed
certificate the policy trusts) and an HTTP receiver on localhost standing in for Slack and a webhook.
The backups, checks and sensors are the real Dagster definitions, run in process on a real PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import ipaddress
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import pytest
from aiosmtpd.controller import Controller
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from regal_dagster.defs import BACKUP_JOB, VERIFY_JOB, build_definitions
from regal_dagster.engine.alerts import AlertBook, Condition, capacity_conditions, evaluate_and_notify
from regal_dagster.engine.catalog import list_backups
from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.policy import load_policy
from regal_dagster.engine.storage import open_repository

from .conftest import DatabaseFactory, load_awkward_data, write_policy_file

BASE_URL = "http://regal.example:3000"
SLACK_ENV = "REGAL_TEST_SLACK_URL"


# --- peers ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "regal-test-smtp")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    directory = tmp_path_factory.mktemp("tls")
    cert_path, key_path = directory / "smtp.pem", directory / "smtp.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class Inbox:
    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []

    async def handle_DATA(self, server, session, envelope) -> str:  # type: ignore[no-untyped-def]
        self.messages.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
        return "250 OK"

    def subjects(self) -> list[str]:
        return [str(m["Subject"]) for m in self.messages]


def _start_smtp(tls_files: tuple[Path, Path], port: int, security: str) -> tuple[Controller, Inbox]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*tls_files)
    inbox = Inbox()
    if security == "ssl":
        controller = Controller(inbox, hostname="127.0.0.1", port=port, ssl_context=context)
    else:
        controller = Controller(inbox, hostname="127.0.0.1", port=port, tls_context=context, require_starttls=True)
    controller.start()
    return controller, inbox


@pytest.fixture
def smtp(tls_files: tuple[Path, Path]) -> Iterator[tuple[int, Inbox]]:
    port = _free_port()
    controller, inbox = _start_smtp(tls_files, port, "starttls")
    try:
        yield port, inbox
    finally:
        controller.stop()


class Receiver:
    """An HTTP server that records JSON POSTs; `status` is what it answers."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict[str, Any]]] = []
        self.status = 200
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if receiver.status == 200:
                    receiver.posts.append((self.path, json.loads(body)))
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def on(self, path: str) -> list[dict[str, Any]]:
        return [body for p, body in self.posts if p == path]


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    r = Receiver()
    monkeypatch.setenv(SLACK_ENV, f"{r.url}/slack")
    try:
        yield r
    finally:
        r.server.shutdown()


def _channels(smtp_port: int, tls_files: tuple[Path, Path], receiver: Receiver,
              security: str = "starttls") -> list[dict[str, Any]]:
    return [
        {"kind": "email", "host": "127.0.0.1", "port": smtp_port, "security": security,
         "sender": "regal-backup@example.test", "recipients": ["ops@example.test"], "ca_file": str(tls_files[0]),
         "timeout": "5s"},
        {"kind": "slack", "webhook_url_env": SLACK_ENV, "timeout": "5s"},
        {"kind": "webhook", "url": f"{receiver.url}/hook", "timeout": "5s"},
    ]


@pytest.fixture
def source(system_pg: DatabaseFactory) -> str:
    dsn = system_pg.create()
    load_awkward_data(dsn)
    return dsn


class Sensors:
    """The code location's sensors, ticked by hand on one Dagster instance (cursor kept between ticks)."""

    def __init__(self, policy_file: Path) -> None:
        self.defs = build_definitions(str(policy_file))
        self.instance = dg.DagsterInstance.ephemeral()
        self.cursors: dict[str, str | None] = {}
        self.checks: dg.ExecuteInProcessResult | None = None

    def run(self, job: str) -> dg.ExecuteInProcessResult:
        """Run a job; after a successful backup run, also the checks `check_new_backups` launches (kept in
        `self.checks`)."""
        result = self.defs.resolve_job_def(job).execute_in_process(instance=self.instance, raise_on_error=False)
        if job == BACKUP_JOB and result.success:
            self.checks = self.defs.resolve_job_def(VERIFY_JOB).execute_in_process(instance=self.instance)
        return result

    def tick(self, name: str) -> None:
        context = dg.build_sensor_context(instance=self.instance, cursor=self.cursors.get(name),
                                          definitions=self.defs, resources=self.defs.resources)
        self.defs.resolve_sensor_def(name)(context)
        self.cursors[name] = context.cursor


# --- the tests -----------------------------------------------------------------------------------------


class SensorClock(dt.datetime):
    """The alert sensors' clock (their module's `datetime`), set by the test instead of slept through: how old
    a backup looks to rpo_watch no longer depends on how fast a loaded machine runs the jobs in between."""

    at: dt.datetime | None = None

    @classmethod
    def now(cls, tz: dt.tzinfo | None = None) -> SensorClock:  # type: ignore[override]
        assert cls.at is not None
        moment = cls.at.astimezone(tz) if tz else cls.at
        return cls.fromtimestamp(moment.timestamp(), moment.tzinfo)


def _newest_finished_at(policy_file: Path) -> dt.datetime:
    policy = load_policy(policy_file)
    manifests, _ = list_backups(open_repository(policy), load_keyring(policy), "pos")
    return max(m.finished_at for m in manifests)


def test_rpo_breach_alerts_once_reminds_and_resolves_after_a_new_backup(
        source: str, tmp_path: Path, master_key: str, smtp: tuple[int, Inbox], receiver: Receiver,
        tls_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    port, inbox = smtp
    policy_file = write_policy_file(tmp_path, {"pos": source}, rpo="6s", dagster={"base_url": BASE_URL},
                                    alerts={"remind_after": "3s", "channels": _channels(port, tls_files, receiver)})
    monkeypatch.setattr("regal_dagster.defs.alerts.sensors.datetime", SensorClock)
    sensors = Sensors(policy_file)
    first = sensors.run(BACKUP_JOB)
    assert first.success
    assert sensors.checks is not None and sensors.checks.get_asset_check_evaluations()
    assert all(e.passed for e in sensors.checks.get_asset_check_evaluations())
    finished = _newest_finished_at(policy_file)

    SensorClock.at = finished + dt.timedelta(seconds=1)
    sensors.tick("rpo_watch")
    assert inbox.messages == [] and receiver.posts == []  # fresh: nothing to say

    SensorClock.at = finished + dt.timedelta(seconds=6.5)  # the newest good backup ages past the RPO
    sensors.tick("rpo_watch")
    sensors.tick("rpo_watch")  # still breached: no second alert
    assert inbox.subjects() == [f"[Regal Backup] ALERT: {_only_alert(receiver)['what']}"]
    alert = inbox.messages[0].get_content()
    assert "Target:  pos" in alert and f"Link:    {BASE_URL}/runs/{first.run_id}" in alert
    assert "First step: " in alert and "regal-backup backup pos" in alert
    assert [b["text"].splitlines()[0] for b in receiver.on("/slack")] == inbox.subjects()
    hook = receiver.on("/hook")[0]
    assert hook["status"] == "alert" and hook["event"] == "rpo_breach" and hook["target"] == "pos"
    assert hook["link"] == f"{BASE_URL}/runs/{first.run_id}" and hook["since"]

    SensorClock.at = finished + dt.timedelta(seconds=6.5 + 3.2)  # the reminder interval passes
    sensors.tick("rpo_watch")
    assert [s.split(":")[0] for s in inbox.subjects()] == ["[Regal Backup] ALERT", "[Regal Backup] STILL FAILING"]

    assert sensors.run(BACKUP_JOB).success  # a new good backup
    SensorClock.at = _newest_finished_at(policy_file) + dt.timedelta(seconds=1)  # seen while it is fresh
    sensors.tick("rpo_watch")
    sensors.tick("rpo_watch")
    assert [s.split(":")[0] for s in inbox.subjects()] == [
        "[Regal Backup] ALERT", "[Regal Backup] STILL FAILING", "[Regal Backup] RESOLVED"]
    assert [b["status"] for b in receiver.on("/hook")] == ["alert", "reminder", "resolved"]
    assert len(receiver.on("/slack")) == 3


def _only_alert(receiver: Receiver) -> dict[str, Any]:
    (hook,) = receiver.on("/hook")
    return hook


def test_a_failed_check_arrives_by_email_with_the_run_link(
        source: str, tmp_path: Path, master_key: str, smtp: tuple[int, Inbox], receiver: Receiver,
        tls_files: tuple[Path, Path]) -> None:
    port, inbox = smtp
    policy_file = write_policy_file(tmp_path, {"pos": source}, dagster={"base_url": BASE_URL},
                                    alerts={"channels": _channels(port, tls_files, receiver)})
    sensors = Sensors(policy_file)
    assert sensors.run(BACKUP_JOB).success
    policy = load_policy(policy_file)
    (manifest,), _ = list_backups(open_repository(policy), load_keyring(policy), "pos")
    damaged = max(manifest.objects, key=lambda o: o.size)
    path = policy.local_repository_path() / damaged.key
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x40
    path.write_bytes(bytes(data))

    verify = sensors.run(VERIFY_JOB)  # the daily re-verification finds it
    integrity = next(e for e in verify.get_asset_check_evaluations() if e.check_name == "integrity")
    assert not integrity.passed and integrity.severity == dg.AssetCheckSeverity.ERROR
    assert integrity.metadata["failing_object"].value == damaged.key

    sensors.tick("backup_alerts")

    assert len(inbox.messages) == 1, [m["Subject"] for m in inbox.messages]
    (message,) = inbox.messages
    assert message["Subject"] == f"[Regal Backup] ALERT: pos: integrity check failed for backup {manifest.backup_id}"
    body = message.get_content()
    assert f"Link:    {BASE_URL}/runs/{verify.run_id}" in body
    assert f"object: {damaged.key}" in body and "fails authentication" in body
    assert "First step: Take a new backup now" in body
    assert _only_alert(receiver)["event"] == "verification_failed"


def test_a_failed_backup_run_alerts_and_resolves_when_a_run_succeeds(
        system_pg: DatabaseFactory, tmp_path: Path, master_key: str, smtp: tuple[int, Inbox],
        receiver: Receiver, tls_files: tuple[Path, Path]) -> None:
    port, inbox = smtp
    name = system_pg.new_name("regal_gone")
    policy_file = write_policy_file(tmp_path, {"pos": system_pg.dsn(name)}, dagster={"base_url": BASE_URL},
                                    alerts={"channels": _channels(port, tls_files, receiver)})
    sensors = Sensors(policy_file)
    failed = sensors.run(BACKUP_JOB)
    assert not failed.success

    sensors.tick("backup_alerts")
    hook = _only_alert(receiver)
    assert hook["event"] == "backup_failed" and hook["link"] == f"{BASE_URL}/runs/{failed.run_id}"
    assert inbox.subjects() == [f"[Regal Backup] ALERT: backup run {failed.run_id[:8]} of pos failed"]

    with psycopg.connect(system_pg.server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # the database is back
    assert sensors.run(BACKUP_JOB).success
    sensors.tick("backup_alerts")
    assert [b["status"] for b in receiver.on("/hook")] == ["alert", "resolved"]


def test_a_channel_that_is_down_is_retried_and_never_raises(
        tmp_path: Path, master_key: str, receiver: Receiver, tls_files: tuple[Path, Path]) -> None:
    port = _free_port()  # nothing listens here yet
    policy_file = write_policy_file(tmp_path, {"pos": "postgresql://nobody@127.0.0.1:1/none"},
                                    alerts={"channels": _channels(port, tls_files, receiver, security="ssl")})
    policy = load_policy(policy_file)
    book = AlertBook()
    condition = Condition("capacity", "capacity", "repository", "repository disk 3% free", f"{BASE_URL}/assets",
                          "Prune old backups or add storage.")
    receiver.status = 500
    now = dt.datetime.now(dt.UTC)

    failures = evaluate_and_notify(policy, book, [condition], now)

    assert len(failures) == 3 and "SMTP 127.0.0.1" in failures[0] and "HTTP 500" in failures[2]
    assert SLACK_ENV not in " ".join(failures) and receiver.url not in failures[1]  # no secret URLs
    assert len(book.outbox) == 3
    book = AlertBook.from_json(book.to_json())  # what a sensor cursor keeps

    controller, inbox = _start_smtp(tls_files, port, "ssl")  # the channels come back
    receiver.status = 200
    try:
        assert evaluate_and_notify(policy, book, [condition], now + dt.timedelta(seconds=60)) == []
    finally:
        controller.stop()
    assert inbox.subjects() == ["[Regal Backup] ALERT: repository disk 3% free"]  # once, late, not twice
    assert [b["status"] for b in receiver.on("/hook")] == ["alert"] and book.outbox == []


def test_capacity_of_a_local_repository_is_measured_against_the_policy(tmp_path: Path, master_key: str) -> None:
    policy_file = write_policy_file(tmp_path, {"pos": "postgresql://nobody@127.0.0.1:1/none"},
                                    alerts={"capacity": {"min_free_fraction": 1.0}})
    policy = load_policy(policy_file)
    repo = open_repository(policy)
    repo.check_ready()
    (condition,) = capacity_conditions(policy, repo)
    assert condition.event == "capacity" and condition.details["total_bytes"] > condition.details["free_bytes"]

    (tmp_path / "relaxed").mkdir()
    relaxed = load_policy(write_policy_file(tmp_path / "relaxed", {"pos": "postgresql://x@127.0.0.1:1/none"},
                                            alerts={"capacity": {"min_free_fraction": 0.0}}))
    assert capacity_conditions(relaxed, open_repository(relaxed)) == []


def test_pagerduty_triggers_an_incident_and_resolves_it_with_one_dedup_key(
        tmp_path: Path, master_key: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Events API v2 as PagerDuty receives it (a local receiver stands in for events.pagerduty.com): the
    alert triggers, a rate-limited delivery waits for the next evaluation, "resolved" resolves the incident."""
    routing_key = "R0UTINGKEY0123456789abcdefabcdef"
    monkeypatch.setenv("REGAL_TEST_PD_KEY", routing_key)
    policy_file = write_policy_file(tmp_path, {"pos": "postgresql://nobody@127.0.0.1:1/none"},
                                    alerts={"channels": [{"kind": "pagerduty", "routing_key_env": "REGAL_TEST_PD_KEY",
                                                          "events_url": f"{receiver.url}/v2/enqueue",
                                                          "timeout": "5s"}]})
    policy = load_policy(policy_file)
    book = AlertBook()
    breach = Condition("rpo:pos", "rpo_breach", "pos", "pos: newest good backup is 2.0 h old, past the RPO of 1.0 h",
                       f"{BASE_URL}/assets/postgres/pos/backup", "Take a backup now with `regal-backup backup pos`.",
                       details={"newest_good_backup": "pos-20261124T020000Z-a1b2c3"})
    now = dt.datetime.now(dt.UTC)

    receiver.status = 429  # PagerDuty's rate limit: try again later
    failures = evaluate_and_notify(policy, book, [breach], now)
    assert len(failures) == 1 and "HTTP 429" in failures[0] and routing_key not in failures[0]
    receiver.status = 200
    assert evaluate_and_notify(policy, book, [breach], now + dt.timedelta(seconds=60)) == []
    assert evaluate_and_notify(policy, book, [], now + dt.timedelta(seconds=120)) == []  # the breach is gone

    trigger, resolve = receiver.on("/v2/enqueue")
    assert trigger["routing_key"] == routing_key and trigger["event_action"] == "trigger"
    assert trigger["dedup_key"] == resolve["dedup_key"] == "regal-backup:rpo:pos"
    payload = trigger["payload"]
    assert payload["severity"] == "critical" and payload["component"] == "pos" and payload["class"] == "rpo_breach"
    assert payload["summary"] == "[Regal Backup] ALERT: " + breach.what and payload["source"] == "regal-backup/pos"
    assert payload["custom_details"]["newest_good_backup"] == "pos-20261124T020000Z-a1b2c3"
    assert trigger["links"] == [{"href": breach.link, "text": "Open in Dagster"}]
    assert resolve == {"routing_key": routing_key, "event_action": "resolve", "dedup_key": "regal-backup:rpo:pos"}


def test_the_file_channel_appends_one_json_line_per_message(tmp_path: Path, master_key: str) -> None:
    policy_file = write_policy_file(tmp_path, {"pos": "postgresql://nobody@127.0.0.1:1/none"},
                                    alerts={"channels": [{"kind": "file", "path": "alerts.jsonl"}]})
    policy = load_policy(policy_file)
    book = AlertBook()
    condition = Condition("capacity", "capacity", "repository", "repository disk 3% free", f"{BASE_URL}/assets",
                          "Prune old backups or add storage.")
    now = dt.datetime.now(dt.UTC)
    assert evaluate_and_notify(policy, book, [condition], now) == []
    assert evaluate_and_notify(policy, book, [], now + dt.timedelta(seconds=60)) == []
    lines = (tmp_path / "alerts.jsonl").read_text().splitlines()
    assert [json.loads(line)["status"] for line in lines] == ["alert", "resolved"]
    assert (tmp_path / "alerts.jsonl").stat().st_mode & 0o777 == 0o600
