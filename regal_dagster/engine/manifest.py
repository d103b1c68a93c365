"""The manifest: what a backup is. Written last; a backup without a manifest does not exist.

Versioned (`version`), with a SHA-256 of its own canonical JSON encoding (`manifest_sha256`).
docs/formats.md is the human description; keep both in step and keep old versions readable.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import IntegrityError

MANIFEST_FORMAT = "regal-backup-manifest"
MANIFEST_VERSION = 2  # 2: one object per table plus a schema archive (1 was a pre-release layout)


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
    plaintext_sha256: str
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
    manifest_sha256: str = ""

    # --- encoding ---------------------------------------------------------------------------------

    def _canonical(self) -> bytes:
        body = self.model_dump(mode="json", exclude={"manifest_sha256"})
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    def sealed(self) -> Manifest:
        return self.model_copy(update={"manifest_sha256": hashlib.sha256(self._canonical()).hexdigest()})

    def to_bytes(self) -> bytes:
        sealed = self.sealed()
        return json.dumps(sealed.model_dump(mode="json"), indent=2, ensure_ascii=False).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        try:
            document = json.loads(data)
        except ValueError:
            raise IntegrityError(f"manifest {where} is not valid JSON", "the manifest is damaged: use another backup") from None
        if not isinstance(document, dict) or document.get("format") != MANIFEST_FORMAT:
            raise IntegrityError(f"{where} is not a regal-backup manifest", "remove the stray file")
        if document.get("version", 0) < MANIFEST_VERSION:
            raise IntegrityError(f"manifest {where} has version {document.get('version')}, a pre-release layout "
                                 f"that this regal-backup does not read", "take a new backup")
        if document.get("version", 0) > MANIFEST_VERSION:
            raise IntegrityError(f"manifest {where} has version {document['version']}; this regal-backup reads "
                                 f"up to {MANIFEST_VERSION}", "upgrade regal-backup")
        try:
            manifest = cls.model_validate(document)
        except ValidationError as exc:
            raise IntegrityError(f"manifest {where} is incomplete: {exc.error_count()} problem(s)",
                                 "the manifest is damaged: use another backup") from None
        if manifest.manifest_sha256 != hashlib.sha256(manifest._canonical()).hexdigest():
            raise IntegrityError(f"manifest {where} fails its own checksum (edited or corrupted)",
                                 "do not trust this backup; use another one and investigate")
        return manifest

    # --- facts people ask for ---------------------------------------------------------------------

    def object(self, name: str) -> ObjectRecord:
        for record in self.objects:
            if record.name == name:
                return record
        raise IntegrityError(f"backup {self.backup_id} has no object {name}", "the manifest is incomplete: use another backup")

    @property
    def locked_until(self) -> datetime | None:
        """The date its objects are under S3 Object Lock until, when they were written locked."""
        return self.retain_until if (self.model_extra or {}).get("object_lock") else None

    @property
    def stored_bytes(self) -> int:
        return sum(o.size for o in self.objects)

    @property
    def plaintext_bytes(self) -> int:
        return sum(o.plaintext_size for o in self.objects)

    @property
    def duration_seconds(self) -> float:
        return (self.finished_at - self.started_at).total_seconds()

    def table_rows(self) -> dict[str, int]:
        return {f"{t['schema']}.{t['name']}": t["rows"] for t in self.source.get("tables", [])}
