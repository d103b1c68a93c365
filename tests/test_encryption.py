"""Backups are encrypted at rest and cannot be read, swapped or forged without the keys."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest

from regal_dagster.engine import crypto
from regal_dagster.engine.backup import run_backup
from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.errors import EncryptionKeyError, IntegrityError
from regal_dagster.engine.manifest import Manifest
from regal_dagster.engine.policy import policy_from_dict
from regal_dagster.engine.storage import open_repository
from regal_dagster.engine.verify import verify_backup

from .conftest import DatabaseFactory, load_awkward_data, make_policy


@pytest.fixture
def backed_up(system_pg: DatabaseFactory, tmp_path: Path, master_key: str):  # type: ignore[no-untyped-def]
    source = system_pg.create()
    load_awkward_data(source)
    policy = make_policy(tmp_path, {"pos": source})
    first = run_backup(policy, "pos").manifest
    second = run_backup(policy, "pos").manifest
    return policy, first, second


def test_no_plaintext_of_the_database_in_stored_bytes(backed_up) -> None:  # type: ignore[no-untyped-def]
    policy, first, second = backed_up
    root = policy.local_repository_path()
    for manifest in (first, second):
        assert len(manifest.objects) == 2  # the schema archive and one pack of both (small) tables
        for record in manifest.objects:
            stored = (root / record.key).read_bytes()
            assert stored.startswith(crypto.OBJECT_MAGIC), record.name
            for needle in [b"customers", b"customer17@example.com", b"tok_", b"Order", "José".encode(),
                           b"large value", b"CREATE TABLE"]:
                assert needle not in stored, (needle, record.name)


def test_a_wrong_master_key_fails_with_a_clear_error(backed_up, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    policy, _, _ = backed_up
    monkeypatch.setenv("REGAL_TEST_MASTER_KEY", crypto.generate_master_key())
    with pytest.raises(EncryptionKeyError, match="does not open the keyset") as err:
        load_keyring(policy)
    assert "master key" in str(err.value)


def test_a_missing_master_key_says_which_variable(backed_up, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    policy, _, _ = backed_up
    monkeypatch.delenv("REGAL_TEST_MASTER_KEY")
    with pytest.raises(EncryptionKeyError, match="REGAL_TEST_MASTER_KEY is not set"):
        load_keyring(policy)


def test_a_garbled_master_key_is_reported(backed_up, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    policy, _, _ = backed_up
    monkeypatch.setenv("REGAL_TEST_MASTER_KEY", "not-a-key")
    with pytest.raises(EncryptionKeyError, match="not a valid key"):
        load_keyring(policy)


def test_a_missing_keyset_is_reported(tmp_path: Path, master_key: str) -> None:
    policy = policy_from_dict({"repository": {"url": "r"}, "encryption": {
        "keyset": "nowhere.json", "master_key": {"env": "REGAL_TEST_MASTER_KEY"}},
        "targets": {"pos": {"kind": "postgres", "dsn": "postgresql:///x"}}}, tmp_path)
    with pytest.raises(EncryptionKeyError, match="does not exist"):
        load_keyring(policy)


def test_another_keyset_cannot_read_the_backup(backed_up, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    policy, manifest, _ = backed_up
    other = make_policy(tmp_path / "other", {"pos": "postgresql:///x"})
    result = verify_backup(open_repository(policy), load_keyring(other), manifest)
    assert not result.ok
    assert "keyset does not hold" in result.problems[0]


def test_objects_swapped_between_backups_are_detected(backed_up) -> None:  # type: ignore[no-untyped-def]
    policy, first, second = backed_up
    root = policy.local_repository_path()
    a, b = root / first.objects[0].key, root / second.objects[0].key
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes)
    b.write_bytes(a_bytes)
    keyring = load_keyring(policy)
    for manifest in (first, second):
        result = verify_backup(open_repository(policy), keyring, manifest)
        assert not result.ok
        assert manifest.objects[0].key in result.problems[0]


def test_a_flipped_byte_is_detected_and_named(backed_up) -> None:  # type: ignore[no-untyped-def]
    policy, manifest, _ = backed_up
    path = policy.local_repository_path() / manifest.objects[0].key
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    result = verify_backup(open_repository(policy), load_keyring(policy), manifest)
    assert not result.ok
    assert result.problems == [(f"object {manifest.objects[0].key} fails authentication: its bytes were changed, "
                                "truncated, or moved from another backup")]


def test_an_edited_manifest_fails_its_checksum(backed_up) -> None:  # type: ignore[no-untyped-def]
    policy, manifest, _ = backed_up
    path = policy.local_repository_path() / f"backups/pos/{manifest.backup_id}/manifest.json"
    edited = bytearray(path.read_bytes())  # encrypted: an edit can only flip ciphertext bits
    edited[len(edited) // 2] ^= 0x01
    key = f"backups/pos/{manifest.backup_id}/manifest.json"
    with pytest.raises(IntegrityError, match=f"{key} fails authentication"):  # nobody without the keys
        Manifest.from_bytes(bytes(edited), key, load_keyring(policy))


def test_master_key_file_must_be_private(tmp_path: Path) -> None:
    key_file = tmp_path / "master.key"
    crypto.write_master_key_file(key_file, crypto.generate_master_key())
    assert key_file.stat().st_mode & 0o777 == 0o600
    policy = policy_from_dict({"repository": {"url": "r"}, "encryption": {
        "keyset": "keyset.json", "master_key": {"file": "master.key"}},
        "targets": {"pos": {"kind": "postgres", "dsn": "postgresql:///x"}}}, tmp_path)
    crypto.create_keyset(policy)
    key_file.chmod(0o644)
    with pytest.raises(EncryptionKeyError, match="chmod 600"):
        load_keyring(policy)


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "reader stops"])
def test_a_big_object_decrypted_by_its_own_thread_is_checked_as_a_small_one(damage: str, tmp_path: Path,
                                                                            master_key: str) -> None:
    """Objects of READ_AHEAD_BYTES and more are authenticated and decrypted by a thread of their own while the
    reader decompresses: every byte still reaches the sink only authenticated, damage is named, and a sink
    that stops leaves no thread behind."""
    from regal_dagster.engine.pipeline import READ_AHEAD_BYTES, read_stream, store_stream

    policy = make_policy(tmp_path, {"pos": "postgresql://unused@127.0.0.1/unused"})
    repo, keyring = open_repository(policy), load_keyring(policy)
    lines = [f"{i}\t{hashlib.sha256(str(i).encode()).hexdigest()}\n".encode() for i in range(150_000)]  # 5 MB stored
    plaintext = b"".join(lines)
    chunks = [plaintext[i:i + (1 << 20)] for i in range(0, len(plaintext), 1 << 20)]
    record = store_stream(repo, "backups/pos/pos-1/tables/00001.copy", chunks, keyring=keyring, backup_id="pos-1",
                          object_name="tables/00001.copy", content="rows")
    assert record.size >= READ_AHEAD_BYTES
    received: list[bytes] = []
    read_stream(repo, record, keyring=keyring, backup_id="pos-1", sink=received.append)
    assert b"".join(received) == plaintext

    path = policy.local_repository_path() / record.key
    stored = bytearray(path.read_bytes())
    if damage == "flipped byte":
        stored[len(stored) * 2 // 3] ^= 0x01
    elif damage == "truncated":
        del stored[-(1 << 16):]
    path.write_bytes(bytes(stored))
    received.clear()

    def stopping_sink(chunk: bytes) -> None:
        received.append(chunk)
        raise RuntimeError("the sink stops")

    if damage == "reader stops":
        with pytest.raises(RuntimeError, match="the sink stops"):
            read_stream(repo, record, keyring=keyring, backup_id="pos-1", sink=stopping_sink)
    else:
        with pytest.raises(IntegrityError, match=record.key):
            read_stream(repo, record, keyring=keyring, backup_id="pos-1", sink=received.append)
        assert plaintext.startswith(b"".join(received))  # what came out before the damage was authentic
    deadline = time.monotonic() + 5
    while any(t.name == "read-ahead" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not [t for t in threading.enumerate() if t.name == "read-ahead"]
