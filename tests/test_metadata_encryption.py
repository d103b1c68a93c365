"""Repository format 3: nobody who can read the bucket (or the audit trail) learns anything of a database's
metadata — its settings, role names, password verifiers — nor can they test a guess of a table's content; and
a format 2 repository becomes one with `regal-backup upgrade`, even when that is killed midway.

Real PostgreSQL (the machine's 15), a real local repository, the real CLI; the attacker reads every byte."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.documents import is_encrypted
from regal_dagster.engine.layout import REPOSITORY_MARKER, checks_key, manifest_key
from regal_dagster.engine.policy import load_policy

from .conftest import DatabaseFactory, run_cli, verified_backup, write_policy_file
from .old_formats import body_of, make_format_2

PIN = "4821"


def _sql(dsn: str, statement: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(statement)
        return cur.fetchall() if cur.description else []


@pytest.fixture
def vault(system_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> Iterator[dict[str, Any]]:
    """A database with a secret setting, a role with a password that it refers to, and a one-row table holding a
    PIN; a policy that records role password hashes, with an audit trail."""
    source = system_pg.create()
    secret, role = f"sk_live_{uuid.uuid4().hex}", f"regal_pin_keeper_{uuid.uuid4().hex[:8]}"
    database = psycopg.conninfo.conninfo_to_dict(source)["dbname"]
    _sql(source, f"ALTER DATABASE \"{database}\" SET app.api_key = '{secret}'")
    _sql(source, f"CREATE ROLE {role} LOGIN PASSWORD 'correct horse battery staple'")
    _sql(source, f"CREATE TABLE pins (pin text); INSERT INTO pins VALUES ('{PIN}'); GRANT SELECT ON pins TO {role}")
    (verifier,) = _sql(source, f"SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'")[0]
    assert str(verifier).startswith("SCRAM-SHA-256$")
    audit = system_pg.create("regal_audit")
    policy_file = write_policy_file(tmp_path, {"pos": source}, audit={"dsn": audit})
    document = yaml.safe_load(policy_file.read_text())
    document["targets"]["pos"]["role_passwords"] = True
    policy_file.write_text(yaml.safe_dump(document))
    try:
        yield {"source": source, "secret": secret, "role": role, "verifier": str(verifier), "audit": audit,
               "policy_file": policy_file, "policy": load_policy(policy_file), "pg": system_pg}
    finally:
        for name in system_pg.created:
            try:
                _sql(system_pg.dsn(name), f"DROP OWNED BY {role}")
            except psycopg.Error:
                continue
        _sql(system_pg.server_dsn, f"DROP ROLE IF EXISTS {role}")


def _repository_bytes(vault: dict[str, Any]) -> bytes:
    """Every byte an attacker reading the bucket sees: names and contents of every file."""
    root = vault["policy"].local_repository_path()
    return b"\n".join(str(p.relative_to(root)).encode() + b"\n" + (p.read_bytes() if p.is_file() else b"")
                      for p in sorted(root.rglob("*")))


def _audit_bytes(vault: dict[str, Any]) -> bytes:
    return "\n".join(str(row) for row in _sql(vault["audit"], "SELECT * FROM regal_audit.events")).encode()


def _digest_forms(data: bytes) -> list[bytes]:
    """How a SHA-256 of `data` could be written down: hex (both cases), raw, base64."""
    import base64

    digest = hashlib.sha256(data)
    return [digest.hexdigest().encode(), digest.hexdigest().upper().encode(), digest.digest(),
            base64.b64encode(digest.digest())]


def test_the_repository_and_the_audit_trail_hold_no_setting_role_verifier_or_content_digest(
        vault: dict[str, Any]) -> None:
    policy_file = vault["policy_file"]
    outputs = []
    backup_id = verified_backup(policy_file)
    for command in (["show", backup_id, "--json"], ["list", "--json"], ["verify", backup_id, "--json"]):
        done = run_cli(policy_file, *command)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout + done.stderr)
    restored = vault["pg"].dsn(vault["pg"].new_name("regal_unlocked"))
    done = run_cli(policy_file, "restore", backup_id, "--to", restored)  # full validation: keyed fingerprints
    assert done.returncode == 0, done.stderr
    outputs.append(done.stdout + done.stderr)
    assert _sql(restored, "SELECT pin FROM pins") == [(PIN,)]
    manifest = body_of(vault["policy"], manifest_key("pos", backup_id))  # with the keys, everything is there
    assert any(vault["secret"] in s for e in manifest["source"]["database_properties"]["settings"]
               for s in e["settings"])
    assert vault["verifier"] in [r.get("password_hash") for r in manifest["source"]["roles"]["roles"]]

    stored, trail = _repository_bytes(vault), _audit_bytes(vault)
    assert stored and trail
    verifier_parts = [p for p in re.split(r"[$:]", vault["verifier"]) if len(p) >= 16]
    needles = [vault["secret"].encode(), vault["role"].encode(), vault["verifier"].encode(),
               *(p.encode() for p in verifier_parts), *_digest_forms(f"{PIN}\n".encode())]
    for needle in needles:
        assert needle not in stored, f"{needle!r} is readable in the repository"
        assert needle not in trail, f"{needle!r} is readable in the audit trail"
    for output in outputs:  # what the operator's commands print (their logs)
        assert vault["verifier"] not in output and vault["secret"] not in output
    for stored_file in vault["policy"].local_repository_path().rglob("*.json"):
        assert "locks" in stored_file.parts or is_encrypted(stored_file.read_bytes()), stored_file


def test_a_dictionary_attack_on_a_stored_pin_finds_nothing(vault: dict[str, Any]) -> None:
    """The attack that recovered a 4-digit PIN from format 2's unkeyed table SHA-256: every candidate's COPY
    text hashed and looked for in every byte of the repository and of the audit trail."""
    verified_backup(vault["policy_file"])
    seen = _repository_bytes(vault) + b"\n" + _audit_bytes(vault)
    hex_in_sight = {m.lower() for m in re.findall(rb"[0-9a-fA-F]{64}", seen)}
    found = [pin for pin in (f"{n:04d}" for n in range(10_000))
             if (forms := _digest_forms(f"{pin}\n".encode()))[0] in hex_in_sight or forms[2] in seen
             or forms[3] in seen]
    assert found == []
    assert hashlib.sha256(f"{PIN}\n".encode()).hexdigest() == hashlib.sha256(b"4821\n").hexdigest()  # the target


def test_swapped_or_moved_encrypted_documents_are_refused_naming_the_file(vault: dict[str, Any]) -> None:
    policy_file, root = vault["policy_file"], vault["policy"].local_repository_path()
    first, second = verified_backup(policy_file), verified_backup(policy_file)
    one, other = root / manifest_key("pos", first), root / manifest_key("pos", second)
    one_bytes, other_bytes = one.read_bytes(), other.read_bytes()
    one.write_bytes(other_bytes)  # two genuine encrypted manifests swapped
    other.write_bytes(one_bytes)
    listing = json.loads(run_cli(policy_file, "list", "--json").stdout)
    damaged = {d["backup_id"]: json.dumps(d) for d in listing["damaged"]}
    assert set(damaged) == {first, second} and listing["backups"] == []
    for backup_id in (first, second):
        assert manifest_key("pos", backup_id) in damaged[backup_id] and "fails authentication" in damaged[backup_id]
    verified = run_cli(policy_file, "verify", first, "--json")
    assert verified.returncode == 3 and manifest_key("pos", first) in verified.stdout
    one.write_bytes(one_bytes)
    other.write_bytes(other_bytes)
    assert run_cli(policy_file, "verify", first).returncode == 0  # its record named the swapped-in manifest

    (root / checks_key(second)).write_bytes((root / checks_key(first)).read_bytes())  # a "good" record moved
    listing = json.loads(run_cli(policy_file, "list", "--json").stdout)
    status = {b["backup_id"]: (b["status"], b["status_note"]) for b in listing["backups"]}
    assert status[first] == ("good", None)
    assert status[second][0] == "unchecked" and checks_key(second) in status[second][1]
    assert "fails authentication" in status[second][1]

    (root / REPOSITORY_MARKER).write_bytes(one_bytes)  # a document moved over the marker
    refused = run_cli(policy_file, "list")
    assert refused.returncode == 3 and REPOSITORY_MARKER in refused.stderr and "fails authentication" in refused.stderr


_KILL_AFTER_ENCRYPTED_WRITES = """
import os, signal, sys
from regal_dagster.engine.documents import is_encrypted
from regal_dagster.engine.storage.local import LocalRepository
written, put = [0], LocalRepository.put_bytes
def put_then_die(self, key, data, retain_until=None):
    put(self, key, data, retain_until)
    written[0] += is_encrypted(data)
    if written[0] == int(os.environ["REGAL_TEST_KILL_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)  # the process dies between two documents, as a power cut would
LocalRepository.put_bytes = put_then_die
from regal_dagster.cli import main
sys.argv[0] = "regal-backup"
sys.exit(main())
"""


def test_a_format_2_repository_is_upgraded_and_a_killed_upgrade_finishes_when_run_again(
        vault: dict[str, Any]) -> None:
    """A repository as format 2 left it (clear documents sealed with a MAC, bare SHA-256 sums, a version 4
    keyset): every command says to upgrade; an upgrade killed after three documents (between a check record and
    its manifest) leaves a repository the next `upgrade` finishes; then every backup is good and restorable."""
    policy, policy_file = vault["policy"], vault["policy_file"]
    root = policy.local_repository_path()
    first, second = verified_backup(policy_file), verified_backup(policy_file)
    written = make_format_2(policy)
    assert manifest_key("pos", first) in written and checks_key(second) in written
    assert b"app.api_key" in (root / manifest_key("pos", first)).read_bytes()  # format 2: readable by anyone
    before = run_cli(policy_file, "list")
    assert before.returncode == 1 and "run `regal-backup upgrade`" in before.stderr

    killed = subprocess.run([sys.executable, "-c", _KILL_AFTER_ENCRYPTED_WRITES, "upgrade", "--policy",
                             str(policy_file)], capture_output=True, text=True, check=False,
                            env={**os.environ, "REGAL_TEST_KILL_AFTER": "3"}, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (half,) = [b for b in (first, second) if is_encrypted((root / checks_key(b)).read_bytes())  # the third write
               and not is_encrypted((root / manifest_key("pos", b)).read_bytes())]  # a pair half done
    assert run_cli(policy_file, "list").returncode == 1  # the marker, written last, still says format 2

    finished = run_cli(policy_file, "upgrade", "--json")
    assert finished.returncode == 0, finished.stdout + finished.stderr
    report = json.loads(finished.stdout)
    assert report["upgraded_from"] == 2 and report["manifests_sealed"] == [half] and report["refused"] == {}
    assert load_keyring(policy).repository_format == 3
    for path in root.rglob("*.json"):
        assert "locks" in path.parts or is_encrypted(path.read_bytes()), path
    listing = json.loads(run_cli(policy_file, "list", "--json").stdout)
    assert {(b["backup_id"], b["status"]) for b in listing["backups"]} == {(first, "good"), (second, "good")}
    assert run_cli(policy_file, "verify", second).returncode == 0
    restored = vault["pg"].dsn(vault["pg"].new_name("regal_upgraded"))
    assert run_cli(policy_file, "restore", first, "--to", restored).returncode == 0
    assert _sql(restored, "SELECT pin FROM pins") == [(PIN,)]
    again = run_cli(policy_file, "upgrade")
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_a_format_3_marker_set_back_to_format_2_or_1_is_refused(vault: dict[str, Any]) -> None:
    """The genuine format 2 marker (its MAC holds) put back after the upgrade, or a plain format 1 one: the
    keyset remembers format 3, so every command and `upgrade` refuse it as a downgrade and change nothing."""
    policy, policy_file = vault["policy"], vault["policy_file"]
    root = policy.local_repository_path()
    verified_backup(policy_file)
    make_format_2(policy)
    format_2_marker = (root / REPOSITORY_MARKER).read_bytes()
    assert run_cli(policy_file, "upgrade").returncode == 0
    manifests = {p: p.read_bytes() for p in root.rglob("manifest.json")}
    format_1_marker = json.dumps({"format": "regal-backup-repository", "version": 1}).encode()
    for old, version in ((format_2_marker, 2), (format_1_marker, 1)):
        (root / REPOSITORY_MARKER).write_bytes(old)
        for command in ("list", "upgrade"):
            refused = run_cli(policy_file, command)
            assert refused.returncode == 3, refused.stdout + refused.stderr
            assert f"says format {version} but this keyset has opened format 3" in refused.stderr
        assert (root / REPOSITORY_MARKER).read_bytes() == old
        assert {p: p.read_bytes() for p in root.rglob("manifest.json")} == manifests


def test_upgrade_of_a_format_2_repository_converts_only_what_its_mac_authenticates(vault: dict[str, Any]) -> None:
    """A keyless writer edits a format 2 check record (failed -> passed, its MAC left as it was) before the
    upgrade: `upgrade` encrypts everything else, leaves that record unconverted, lists it and exits 3; readers
    keep refusing it, so the backup is not shown as good on its word."""
    policy, policy_file = vault["policy"], vault["policy_file"]
    root = policy.local_repository_path()
    first, second = verified_backup(policy_file), verified_backup(policy_file)
    make_format_2(policy)
    record_path = root / checks_key(second)
    record = json.loads(record_path.read_bytes())
    record["trigger"] = {"cli": "forged"}  # any edit under the MAC
    record_path.write_text(json.dumps(record))

    done = run_cli(policy_file, "upgrade", "--json")

    assert done.returncode == 3, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert list(report["refused"]) == [checks_key(second)]
    assert not is_encrypted(record_path.read_bytes())  # not vouched for: left as it was
    assert is_encrypted((root / checks_key(first)).read_bytes())
    listing = json.loads(run_cli(policy_file, "list", "--json").stdout)
    statuses = {b["backup_id"]: b["status"] for b in listing["backups"]}
    assert statuses[first] == "good" and statuses[second] != "good"
