"""Repositories as earlier regal-backup versions left them, made from a current one with the keys: what the
upgrade tests start from. Format 2: documents in clear JSON sealed with a MAC (documents.seal_format_2, the
code path upgrade reads them with), bare SHA-256 sums of content, a version 4 keyset without document AEAD keys.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from regal_dagster.engine import crypto
from regal_dagster.engine.crypto import Keyring, load_keyring
from regal_dagster.engine.documents import canonical, is_encrypted, seal_format_2, unseal
from regal_dagster.engine.errors import IntegrityError
from regal_dagster.engine.layout import REPOSITORY_MARKER, checks_key, is_manifest_key, wal_scope
from regal_dagster.engine.manifest import ObjectRecord
from regal_dagster.engine.pipeline import read_stream
from regal_dagster.engine.policy import Policy
from regal_dagster.engine.storage import Repository, open_repository

KINDS = ["repository", "manifest", "checks", "backup-deletion", "wal", "wal-continuity", "restore-sample",
         "restore-test", "drill", "prune-log", "audit-checkpoint", "audit-spool", "record-state"]


def stored_document(keyring: Keyring, key: str, data: bytes) -> tuple[str, dict[str, Any]]:
    """The kind and body of an encrypted document (with the keys: the test's view, not an attacker's)."""
    for kind in KINDS:
        try:
            return kind, unseal(keyring, kind, key, data)
        except IntegrityError:
            continue
    raise AssertionError(f"{key} is no document of a known kind")


def body_of(policy: Policy, key: str) -> dict[str, Any]:
    repo = open_repository(policy)
    return stored_document(load_keyring(policy), key, repo.get_bytes(key))[1]


def plaintext_sha256(repo: Repository, keyring: Keyring, record: dict[str, Any], scope: str) -> str:
    digest = hashlib.sha256()
    read_stream(repo, ObjectRecord.model_validate(record), keyring=keyring, backup_id=scope, sink=digest.update)
    return digest.hexdigest()


def with_bare_digests(repo: Repository, keyring: Keyring, body: dict[str, Any], scope: str) -> dict[str, Any]:
    """A manifest body as format 2 wrote it: every keyed fingerprint of an object's content (and of a packed
    table's extent of it) back to its SHA-256."""
    bare = {r["plaintext_sha256"]: plaintext_sha256(repo, keyring, r, scope) for r in body["objects"]}
    packed = [t for t in body.get("source", {}).get("tables", []) if "offset" in t]
    for name in {t["object"] for t in packed}:
        record = next(r for r in body["objects"] if r["name"] == name)
        plaintext = bytearray()
        read_stream(repo, ObjectRecord.model_validate(record), keyring=keyring, backup_id=scope,
                    sink=plaintext.extend)
        for table in (t for t in packed if t["object"] == name):
            extent = bytes(plaintext[table["offset"]:table["offset"] + table["length"]])
            bare[table["sha256"]] = hashlib.sha256(extent).hexdigest()

    def back(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: back(v) for k, v in value.items()}
        if isinstance(value, list):
            return [back(v) for v in value]
        return bare.get(value, value) if isinstance(value, str) else value

    return back(body)


def make_format_2(policy: Policy) -> list[str]:
    """Rewrite the repository and keyset as format 2 left them; the keys of the documents rewritten."""
    repo, keyring = open_repository(policy), load_keyring(policy)
    written = []
    keys = sorted((s.key for s in repo.list("") if s.key.endswith(".json") and not s.key.startswith("locks/")),
                  key=lambda k: (not is_manifest_key(k), k))
    manifests: dict[str, dict[str, Any]] = {}
    for key in keys:
        data = repo.get_bytes(key)
        if not is_encrypted(data):
            continue
        kind, body = stored_document(keyring, key, data)
        if kind == "manifest":
            body = {**with_bare_digests(repo, keyring, body, body["backup_id"]), "version": 3}
            manifests[body["backup_id"]] = body
        elif kind == "wal":
            target = key.split("/")[1]
            body = {**body, "object": {**body["object"], "plaintext_sha256": plaintext_sha256(
                repo, keyring, body["object"], wal_scope(target))}}
        elif kind == "checks":
            checked = manifests.get(body["backup_id"])
            body = {**body, "version": 2, "manifest_digest": hashlib.sha256(canonical(checked)).hexdigest()
                    if checked and key == checks_key(body["backup_id"]) else ""}
        elif kind == "repository":
            body = {**body, "version": 2}
        repo.put_bytes(key, seal_format_2(keyring, kind, key, body))
        written.append(key)
    assert REPOSITORY_MARKER in written
    write_keyset_v4(policy, keyring, repository_format=2)
    return written


def write_keyset_v4(policy: Policy, keyring: Keyring, repository_format: int | None) -> None:
    """The keyset as version 4 wrote it: object and MAC keys, no document AEAD keys."""
    path = policy.resolve_path(policy.encryption.keyset)
    master, stream, macs = keyring.origin.master, keyring.stream, keyring.macs  # type: ignore[union-attr]
    assert macs is not None

    def part(name: bytes) -> bytes:
        return crypto._keyset_aad_v3(name, stream.history, macs.history, repository_format, 4)

    path.write_text(json.dumps({
        "format": "regal-backup-keyset", "version": 4, "template": crypto.STREAMING_TEMPLATE_NAME,
        "primary_key_id": stream.primary_key_id, "keys": crypto._canonical_dates(stream.history),
        "mac_template": crypto.MAC_TEMPLATE_NAME, "mac_primary_key_id": macs.primary_key_id,
        "mac_keys": crypto._canonical_dates(macs.history), "repository_format": repository_format,
        "encrypted_keyset": crypto.tink.json_proto_keyset_format.serialize_encrypted(
            stream.handle, master, part(b"streaming-aead")),
        "encrypted_mac_keyset": crypto.tink.json_proto_keyset_format.serialize_encrypted(
            macs.handle, master, part(b"mac"))}))


def repository_file(policy: Policy, key: str) -> Path:
    return policy.local_repository_path() / key


def manifest_body(policy_file: Path, target: str, backup_id: str) -> dict[str, Any]:
    """A backup's manifest as its body (read with the keys: it is encrypted in the repository)."""
    from regal_dagster.engine.layout import manifest_key
    from regal_dagster.engine.policy import load_policy

    return body_of(load_policy(policy_file), manifest_key(target, backup_id))
