"""`regal-backup upgrade`: a format 1 repository (self-checksummed manifests, plain JSON documents) becomes a
format 2 one, where every document is sealed with the keyset's document keys.

Under the keys lock: the keyset gains document (MAC) keys if it has none; every version 2 manifest whose own
SHA-256 still holds is sealed as version 3 (one that does not is left as it is and reported: it shows as
DAMAGED); its check record is sealed and tied to it; every other document (restore-test, drill and sample
records, prune logs, audit checkpoints and spooled events) is sealed as it is; the marker last. Running it
again does nothing. What upgrade seals it takes as it finds it: run it before anyone but the backup service
can write the repository (docs/formats.md, threat model).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .audit import CHECKPOINT_KIND, SPOOL_KIND, audited
from .checks import CHECKS_KIND
from .crypto import Keyring, load_keyring, save_keyring
from .documents import SEAL, canonical, write_document
from .drill import DRILL_KIND
from .errors import RegalError
from .layout import (
    AUDIT_CHECKPOINTS,
    AUDIT_SPOOL,
    BACKUPS,
    DRILLS,
    KEYS_LOCK,
    PRUNE_LOGS,
    REPOSITORY_MARKER,
    RESTORE_SAMPLES,
    RESTORE_TESTS,
    checks_key,
    is_manifest_key,
)
from .manifest import MANIFEST_VERSION, Manifest
from .policy import Policy
from .repository_format import (
    FORMAT_VERSION,
    MARKER_FORMAT,
    REPOSITORY_KIND,
    NoRepositoryError,
    marker_version,
)
from .restore_test import RESTORE_TEST_KIND
from .retention import PRUNE_LOG_KIND
from .sampling import SAMPLE_KIND
from .storage import Repository, open_repository

_DOCUMENTS = [(RESTORE_SAMPLES, SAMPLE_KIND), (RESTORE_TESTS, RESTORE_TEST_KIND), (DRILLS, DRILL_KIND),
              (PRUNE_LOGS, PRUNE_LOG_KIND), (AUDIT_CHECKPOINTS, CHECKPOINT_KIND), (AUDIT_SPOOL, SPOOL_KIND)]


@dataclass
class UpgradeReport:
    keyset_upgraded: bool = False
    manifests_sealed: list[str] = field(default_factory=list)
    documents_sealed: int = 0
    refused: dict[str, str] = field(default_factory=dict)  # key -> why it was left unsealed
    already_current: bool = False


def upgrade_repository(policy: Policy, repo: Repository | None = None) -> UpgradeReport:
    repo = repo or open_repository(policy)
    report = UpgradeReport()
    with audited(policy, repo, "repository_upgrade", repo.location) as details, repo.lock(KEYS_LOCK):
        keyring = load_keyring(policy)
        if keyring.macs is None:
            keyring = save_keyring(keyring.with_document_keys())
            report.keyset_upgraded = True
        if repo.size(REPOSITORY_MARKER) is None:
            raise NoRepositoryError(repo.location)
        if marker_version(repo.get_bytes(REPOSITORY_MARKER)) >= FORMAT_VERSION:
            report.already_current = True
            return report
        for stored in list(repo.list(BACKUPS)):
            if is_manifest_key(stored.key):
                _seal_manifest(repo, keyring, stored.key, report)
        for prefix, kind in _DOCUMENTS:
            for stored in list(repo.list(prefix)):
                if kind != RESTORE_TEST_KIND or not stored.key.startswith(RESTORE_SAMPLES):
                    _seal_document(repo, keyring, kind, stored.key, report)
        legacy = json.loads(repo.get_bytes(REPOSITORY_MARKER))
        write_document(repo, keyring, REPOSITORY_KIND, REPOSITORY_MARKER, {
            "format": MARKER_FORMAT, "version": FORMAT_VERSION,
            "created_at": legacy.get("created_at") or datetime.now(UTC).isoformat(timespec="seconds"),
            "repository_id": hashlib.sha256(canonical(legacy)).hexdigest()[:16], "upgraded_from": 1})
        details.update(manifests_sealed=len(report.manifests_sealed), documents_sealed=report.documents_sealed,
                       refused=report.refused)
    return report


def legacy_manifest(data: bytes, key: str) -> dict[str, Any]:
    """A version 2 manifest's body, once its own SHA-256 holds (what version 2 promised)."""
    try:
        document = json.loads(data)
    except ValueError:
        raise RegalError(f"{key} is not valid JSON", "the manifest is damaged") from None
    if not isinstance(document, dict) or document.get("version") != 2:
        raise RegalError(f"{key} is not a version 2 manifest", "leave it for investigation")
    claimed = document.pop("manifest_sha256", "")
    if hashlib.sha256(canonical(document)).hexdigest() != claimed:
        raise RegalError(f"{key} fails its own checksum: it was edited or damaged before the upgrade",
                         "it stays unsealed (DAMAGED); investigate before trusting it")
    return document


def _seal_manifest(repo: Repository, keyring: Keyring, key: str, report: UpgradeReport) -> None:
    data = repo.get_bytes(key)
    if SEAL in json.loads(data):
        return
    try:
        body = legacy_manifest(data, key)
    except RegalError as exc:
        report.refused[key] = exc.message
        return
    manifest = Manifest.model_validate({**body, "version": MANIFEST_VERSION})
    repo.put_bytes(key, manifest.to_bytes(keyring), manifest.locked_until)
    report.manifests_sealed.append(manifest.backup_id)
    record_key = checks_key(manifest.backup_id)
    if repo.size(record_key) is not None:
        record = json.loads(repo.get_bytes(record_key))
        if SEAL not in record:  # the record checked this manifest: it is now tied to it
            write_document(repo, keyring, CHECKS_KIND, record_key,
                           {**record, "version": 2, "manifest_digest": manifest.digest()})


def _seal_document(repo: Repository, keyring: Keyring, kind: str, key: str, report: UpgradeReport) -> None:
    try:
        body = json.loads(repo.get_bytes(key))
    except ValueError:
        report.refused[key] = f"{key} is not valid JSON"
        return
    if isinstance(body, dict) and SEAL not in body:
        write_document(repo, keyring, kind, key, body)
        report.documents_sealed += 1
