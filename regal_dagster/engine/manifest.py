"""The manifest: what a backup is. Written last; a backup without a manifest does not exist.

Versioned (`version`) and encrypted (engine/documents.py): Tink AEAD with the keyset's document keys, bound
to its own key in the repository, so nobody without the keys can read it or change what a restore brings back,
and a manifest copied over another backup's is refused. Its content fingerprints (`plaintext_sha256`, a
table's `sha256`) are keyed (Keyring.fingerprint), never a bare SHA-256 of data. Version 3 manifests (sealed,
clear, bare SHA-256 sums) and version 2 ones (a SHA-256 of themselves, which anyone can recompute) are
converted by `regal-backup upgrade` (engine/upgrade.py).
docs/formats.md is the human description; keep both in step.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from .crypto import Keyring
from .documents import canonical, seal, unseal
from .errors import IntegrityError
from .layout import manifest_key

MANIFEST_FORMAT: Literal["regal-backup-manifest"] = "regal-backup-manifest"
MANIFEST_VERSION = 4  # 4: encrypted, keyed fingerprints, postgres tables may be packed several to an object
# (offset, length); 3: sealed; 2: self-checksummed (both upgraded by `regal-backup upgrade`); 1: pre-release
DOCUMENT_KIND = "manifest"


def is_sha256(value: Any) -> bool:
    """A bare SHA-256 as hex (what a manifest must not hold: Keyring.fingerprint keys it)."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def keyed_facts(keyring: Keyring, value: Any) -> Any:
    """Source facts with every bare SHA-256 named `sha256` (a file's content, a table's rows) keyed: a kind
    records content sums as `sha256` and the engine keys them before the manifest is written."""
    if isinstance(value, dict):
        return {k: keyring.fingerprint(v) if k == "sha256" and is_sha256(v) else keyed_facts(keyring, v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [keyed_facts(keyring, item) for item in value]
    return value


class CompressionInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    algorithm: Literal["zstd"] = "zstd"
    level: int
    hash_log: int | None = None


class EncryptionInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    scheme: str  # e.g. tink-streaming-aead/AES256_GCM_HKDF_1MB
    key_id: int
    object_format: int


class ObjectRecord(BaseModel):
    """One stored object of a backup."""

    model_config = ConfigDict(extra="allow")
    name: str  # e.g. "database.pgdump"
    key: str  # repository key
    content: str  # what the plaintext is, e.g. "pg_dump custom archive"
    size: int  # stored bytes
    stored_sha256: str
    plaintext_size: int
    plaintext_sha256: str  # the keyed fingerprint of the plaintext (Keyring.fingerprint of its SHA-256)
    compression: CompressionInfo
    encryption: EncryptionInfo


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")
    format: Literal["regal-backup-manifest"] = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION
    backup_id: str
    target: str
    kind: str
    retention_class: str
    retain_until: datetime
    started_at: datetime
    finished_at: datetime
    tool_versions: dict[str, str]
    source: dict[str, Any]  # kind-specific facts (docs/formats.md)
    objects: list[ObjectRecord]
    trigger: dict[str, str] = {}  # who started it: cli user, dagster run id, schedule
    ledger_revision: int = 0  # the GDPR erasure ledger's version when the backup was taken (rollback detection)
    object_lock: dict[str, str] | None = None  # {mode, retain_until}: written under S3 Object Lock

    # --- encoding ---------------------------------------------------------------------------------

    def body(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def digest(self) -> str:
        """SHA-256 of the canonical body: names this exact manifest (a check record says which it checked)."""
        return hashlib.sha256(canonical(self.body())).hexdigest()

    def fingerprint(self, keyring: Keyring) -> str:
        """The keyed fingerprint of this exact manifest (what a check record stores)."""
        return keyring.fingerprint(self.digest())

    def to_bytes(self, keyring: Keyring) -> bytes:
        return seal(keyring, DOCUMENT_KIND, manifest_key(self.target, self.backup_id), self.body())

    @classmethod
    def from_bytes(cls, data: bytes, where: str, keyring: Keyring) -> Manifest:
        """The manifest stored at `where` (its repository key), once it decrypts and authenticates."""
        document = unseal(keyring, DOCUMENT_KIND, where, data)
        if document.get("format") != MANIFEST_FORMAT:
            raise IntegrityError(f"{where} is not a regal-backup manifest", "remove the stray file")
        version = document.get("version", 0)
        if not isinstance(version, int) or version < MANIFEST_VERSION:
            raise IntegrityError(f"manifest {where} has version {version}, from before encrypted manifests",
                                 "run `regal-backup upgrade` once (it converts every backup of this repository)")
        if version > MANIFEST_VERSION:
            raise IntegrityError(f"manifest {where} has version {version}; this regal-backup reads "
                                 f"up to {MANIFEST_VERSION}", "upgrade regal-backup")
        try:
            manifest = cls.model_validate(document)
        except ValidationError as exc:
            raise IntegrityError(f"manifest {where} is incomplete: {exc.error_count()} problem(s)",
                                 "the manifest is damaged: use another backup") from None
        if manifest_key(manifest.target, manifest.backup_id) != where:  # defence in depth: the seal binds it
            raise IntegrityError(f"manifest {where} describes backup {manifest.backup_id}",
                                 "do not trust it; investigate who can write the repository")
        return manifest

    # --- facts people ask for ---------------------------------------------------------------------

    def object(self, name: str) -> ObjectRecord:
        for record in self.objects:
            if record.name == name:
                return record
        raise IntegrityError(f"backup {self.backup_id} has no object {name}",
                             "the manifest is incomplete: use another backup")

    @property
    def locked_until(self) -> datetime | None:
        """The date its objects are under S3 Object Lock until, when they were written locked."""
        return self.retain_until if self.object_lock else None

    @property
    def stored_bytes(self) -> int:
        return sum(o.size for o in self.objects)

    @property
    def plaintext_bytes(self) -> int:
        return sum(o.plaintext_size for o in self.objects)

    @property
    def is_incremental(self) -> bool:
        """An incremental base backup (postgres_cluster): restorable only with the backups it is built on."""
        return self.source.get("backup_type") == "incremental"

    @property
    def duration_seconds(self) -> float:
        return (self.finished_at - self.started_at).total_seconds()

    def table_rows(self) -> dict[str, int]:
        return {f"{t['schema']}.{t['name']}": t["rows"] for t in self.source.get("tables", [])}
