"""Sentry: failures reach a real local HTTP receiver standing in for Sentry (it records every envelope), tagged
with the target and the backup id, with no secret in any of them; a Sentry that cannot be reached changes nothing
and is logged once."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import logging
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from regal_dagster.engine.alerts import AlertBook, Condition, check_conditions, evaluate_and_notify
from regal_dagster.engine.catalog import list_backups
from regal_dagster.engine.channels import sentry
from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.policy import load_policy
from regal_dagster.engine.storage import open_repository

from .conftest import DatabaseFactory, run_cli, wait_for, write_policy_file

DSN_ENV = "REGAL_TEST_SENTRY_DSN"
PLANTED = {"PGPASSWORD": "planted-pg-password-7781", "AWS_SECRET_ACCESS_KEY": "planted-aws-secret-8812",
           "REGAL_SMTP_PASSWORD": "planted-smtp-password-9923"}


class SentryReceiver:
    """A real HTTP server where the DSN points: records each envelope's bytes (decompressed) and its path."""

    def __init__(self) -> None:
        self.envelopes: list[tuple[str, bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                elif self.headers.get("Content-Encoding") == "br":  # sentry-sdk's choice when brotli is there
                    import brotli  # type: ignore[import-not-found, import-untyped, unused-ignore]

                    body = brotli.decompress(body)
                receiver.envelopes.append((self.path, body))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[dict[str, object]]:
        found = []
        for _path, body in self.envelopes:
            for line in body.split(b"\n"):
                if line.startswith(b"{") and b'"message"' in line:
                    found.append(json.loads(line))
        return found


@pytest.fixture
def receiver() -> Iterator[SentryReceiver]:
    r = SentryReceiver()
    try:
        yield r
    finally:
        r.server.shutdown()


def test_failures_reach_sentry_tagged_and_with_no_secret(
        system_pg: DatabaseFactory, tmp_path: Path, master_key: str, receiver: SentryReceiver,
        monkeypatch: pytest.MonkeyPatch) -> None:
    dsn = f"http://publickey0123:planted-dsn-secret-4455@127.0.0.1:{receiver.port}/42"
    monkeypatch.setenv(DSN_ENV, dsn)
    for name, value in PLANTED.items():
        monkeypatch.setenv(name, value)
    unreachable = "postgresql://regal:planted-target-password-6677@127.0.0.1:1/regalpos"
    policy_file = write_policy_file(tmp_path, {"pos": system_pg.create(), "lost": unreachable},
                                    alerts={"channels": [{"kind": "sentry", "dsn_env": DSN_ENV,
                                                          "environment": "test"}]})

    # a CLI backup that fails: one event, tagged with the command and the target
    failed = run_cli(policy_file, "backup", "lost")
    assert failed.returncode == 1
    # a backup whose check fails (a flipped byte), found by `verify` (exit 3) and by the alert sensors' condition
    done = run_cli(policy_file, "backup", "pos", "--no-verify", "--json")
    assert done.returncode == 0, done.stderr
    backup_id = json.loads(done.stdout)["backup_id"]
    policy = load_policy(policy_file)
    repo, keyring = open_repository(policy), load_keyring(policy)
    manifest = list_backups(repo, keyring, "pos")[0][0]
    damaged = policy.local_repository_path() / max(manifest.objects, key=lambda o: o.size).key
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x01
    damaged.write_bytes(bytes(data))
    assert run_cli(policy_file, "verify", backup_id).returncode == 3
    now = dt.datetime.now(dt.UTC)
    conditions = check_conditions(policy, repo, keyring)
    conditions.append(Condition("restore_test:pos", "restore_test_failed", "pos", "pos: restore test failed",
                                "http://x/runs", "read it", now,
                                {"backup": backup_id, "finding": f"could not connect to {unreachable}"}))
    book = AlertBook()
    assert evaluate_and_notify(policy, book, conditions, now) == [] and not book.outbox
    for channel in policy.alerts.channels:
        assert isinstance(channel, sentry.SentryChannel)
        sentry.flush(channel)

    events = wait_for(lambda: receiver.events() if len(receiver.events()) >= 4 else None, "4 Sentry events", 20)
    tags = [e["tags"] for e in events]
    assert {"command": "backup", "target": "lost", "exit_code": "1", "source": "regal-backup"}.items() \
        <= tags[0].items()  # type: ignore[union-attr]
    assert {"command": "verify", "backup_id": backup_id, "exit_code": "3"}.items() <= tags[1].items()  # type: ignore[union-attr]
    by_event = {t["event"]: t for t in tags[2:]}  # type: ignore[index]
    assert by_event["verification_failed"]["backup_id"] == backup_id and by_event["verification_failed"]["target"] \
        == "pos"
    assert by_event["restore_test_failed"]["backup_id"] == backup_id
    assert all(receiver_path == "/api/42/envelope/" for receiver_path, _ in receiver.envelopes)

    everything = b"\n".join(body for _, body in receiver.envelopes)
    for secret in [*PLANTED.values(), dsn, "planted-dsn-secret-4455", "planted-target-password-6677", master_key]:
        assert secret.encode() not in everything, secret
    assert b'"vars"' not in everything and b'"threads"' not in everything  # no frame's values, ever


def test_an_unreachable_sentry_changes_nothing_and_is_logged_once(
        tmp_path: Path, master_key: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(DSN_ENV, f"http://publickey0123@127.0.0.1:{port}/7")
    policy_file = write_policy_file(tmp_path, {"pos": "postgresql://127.0.0.1:1/none"},
                                    alerts={"channels": [{"kind": "sentry", "dsn_env": DSN_ENV}]})
    policy = load_policy(policy_file)
    now = dt.datetime.now(dt.UTC)
    book = AlertBook()
    conditions = [Condition(f"check:pos:{n}", "check_failed", "pos", f"pos: {n} failed", "http://x", "look", now)
                  for n in ("integrity", "size", "encryption")]
    with caplog.at_level(logging.WARNING, logger="regal_backup.sentry"):
        assert evaluate_and_notify(policy, book, conditions, now) == []  # queued, never raised
        assert not book.outbox
        sentry.flush(policy.alerts.channels[0])  # type: ignore[arg-type]
    told = [r for r in caplog.records if r.name == "regal_backup.sentry"]
    assert len(told) == 1 and "could not be reached" in told[0].getMessage()
