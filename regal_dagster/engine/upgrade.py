"""`regal-backup upgrade`: a format 2 repository (documents in clear JSON, sealed with a MAC; bare SHA-256 sums of
content) or a format 1 one (self-checksummed manifests, plain JSON documents) becomes a format 3 one, where every
document is encrypted with the keyset's document keys and content fingerprints are keyed.

Under the keys lock, first: a repository whose marker says an older format than the keyset (or the audit trail)
knows it had is a downgrade, refused before anything changes. Then the keyset gains the keys it lacks (MAC,
document AEAD).

Format 2: every document whose MAC verifies (as one of the known kinds, at its own key) is rewritten encrypted,
one document at a time (each a single atomic write), its bare SHA-256 sums keyed on the way (a manifest's
objects and every fact equal to an object's content; a WAL record's object; a check record's manifest digest,
written before its manifest so that a killed upgrade finishes the pair the same way). A document already
encrypted is left alone, so an upgrade killed midway finishes when run again. One whose MAC fails is refused
and listed. The marker is rewritten last.

Format 1: upgrade encrypts only what it can authenticate by another route than the unsealed file itself (which
anyone who can write the repository could have written):
- a version 2 manifest whose own SHA-256 holds, every object it names authenticating under its backup id and
  name (the objects' AEAD) with both recorded SHA-256 sums and sizes, and every fact it ties to an object
  (a table's `sha256`) equal to that object's content; its check record when the audit trail's newest
  verification of the backup recorded the same outcomes;
- a restore-test record, drill record, prune log or audit checkpoint that the audit trail recorded (same
  outcome and timings, the log's key and hash, the checkpoint's hash at its sequence number);
- never a spooled audit event nor a restore sample: nothing else holds them.
Everything else stays unsealed (readers keep refusing it) and is listed in the report, by file, with what
to do; the command then exits 3. The marker is encrypted last and the keyset records format 3. Running it
again does nothing. docs/formats.md says what upgrade vouches for and what it cannot tell.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from .audit import CHECKPOINT_KIND, SPOOL_KIND, AuditEvent, AuditTrail, audited
from .catalog import DELETION_KIND
from .check_record import CHECKS_KIND
from .crypto import Keyring, load_keyring, save_keyring
from .documents import canonical, is_encrypted, seal, unseal_format_2, write_document
from .drill import DRILL_KIND
from .errors import IntegrityError, RegalError
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
    backup_prefix,
    checks_key,
    is_manifest_key,
    manifest_key,
)
from .manifest import DOCUMENT_KIND, MANIFEST_VERSION, Manifest, is_sha256, keyed_facts
from .pipeline import read_stream
from .policy import Policy
from .record_sequence import RECORD_STATE_KIND
from .repository_format import (
    FORMAT_VERSION,
    MARKER_FORMAT,
    REPOSITORY_KIND,
    FormatDowngradeError,
    NoRepositoryError,
    marker_version,
    refuse_downgrade,
    remember_format,
)
from .restore_test import RESTORE_TEST_KIND
from .retention import PRUNE_LOG_KIND
from .sampling import SAMPLE_KIND
from .sources.postgres_cluster.wal import RECORD_KIND as WAL_RECORD_KIND
from .sources.postgres_cluster.walproof import CONTINUITY_KIND
from .storage import Repository, open_repository

_DOCUMENTS = [(RESTORE_SAMPLES, SAMPLE_KIND), (RESTORE_TESTS, RESTORE_TEST_KIND), (DRILLS, DRILL_KIND),
              (PRUNE_LOGS, PRUNE_LOG_KIND), (AUDIT_CHECKPOINTS, CHECKPOINT_KIND), (AUDIT_SPOOL, SPOOL_KIND)]


@dataclass
class UpgradeReport:
    keyset_upgraded: bool = False
    upgraded_from: int = 0
    manifests_sealed: list[str] = field(default_factory=list)  # backups whose manifest is now encrypted
    documents_sealed: int = 0  # other documents now encrypted
    refused: dict[str, str] = field(default_factory=dict)  # key -> why it was left unsealed, and what to do
    already_current: bool = False


def upgrade_repository(policy: Policy, repo: Repository | None = None) -> UpgradeReport:
    repo = repo or open_repository(policy)
    report = UpgradeReport()
    with audited(policy, repo, "repository_upgrade", repo.location) as details, repo.lock(KEYS_LOCK):
        keyring = load_keyring(policy)
        if repo.size(REPOSITORY_MARKER) is None:
            raise NoRepositoryError(repo.location)
        marker = marker_version(repo.get_bytes(REPOSITORY_MARKER))
        refuse_downgrade(repo, keyring, marker)  # before anything changes
        if marker >= FORMAT_VERSION:
            report.already_current = True
            details.update(format=FORMAT_VERSION)
            return report
        trail = _TrailWitness.read(policy, repo, keyring)
        if trail.upgraded_to > marker:
            raise FormatDowngradeError(repo.location, marker, trail.upgraded_to, "the audit trail records an "
                                       f"upgrade of this repository to format {trail.upgraded_to}")
        legacy = _legacy_marker(repo, keyring, marker)
        if keyring.macs is None or keyring.aeads is None:
            keyring = save_keyring(keyring.with_document_keys())
            report.keyset_upgraded = True
        report.upgraded_from = marker
        if marker == 1:
            _upgrade_format_1(repo, keyring, report, trail)
        else:
            _encrypt_format_2(repo, keyring, report)
        write_document(repo, keyring, REPOSITORY_KIND, REPOSITORY_MARKER, {
            "format": MARKER_FORMAT, "version": FORMAT_VERSION,
            "created_at": legacy.get("created_at") or datetime.now(UTC).isoformat(timespec="seconds"),
            "repository_id": legacy.get("repository_id") or hashlib.sha256(canonical(legacy)).hexdigest()[:16],
            "upgraded_from": marker})
        remember_format(repo, keyring, FORMAT_VERSION, locked=True)
        details.update(format=FORMAT_VERSION, upgraded_from=marker, manifests_sealed=len(report.manifests_sealed),
                       documents_sealed=report.documents_sealed, refused=report.refused)
    return report


def _legacy_marker(repo: Repository, keyring: Keyring, marker: int) -> dict[str, Any]:
    """The marker's body: format 1 in plain JSON; format 2 once its MAC verifies (else nothing changes)."""
    data = repo.get_bytes(REPOSITORY_MARKER)
    if marker == 1:
        return dict(json.loads(data))
    body = unseal_format_2(keyring, REPOSITORY_KIND, REPOSITORY_MARKER, data) if keyring.macs is not None else None
    if body is None:
        raise IntegrityError(f"{REPOSITORY_MARKER} of {repo.location} says format {marker} but fails authentication",
                             f"do not run `regal-backup upgrade`; restore {REPOSITORY_MARKER} from the off-site copy")
    return body


def _upgrade_format_1(repo: Repository, keyring: Keyring, report: UpgradeReport, trail: _TrailWitness) -> None:
    for stored in list(repo.list(BACKUPS)):
        if is_manifest_key(stored.key):
            _seal_manifest(repo, keyring, stored.key, report, trail)
    for prefix, kind in _DOCUMENTS:
        for stored in list(repo.list(prefix)):
            if kind != RESTORE_TEST_KIND or not stored.key.startswith(RESTORE_SAMPLES):
                _seal_document(repo, keyring, kind, stored.key, report, trail)


# every kind a format 2 repository held; a sealed document verifies as exactly the one it was written as
_FORMAT_2_KINDS = [DOCUMENT_KIND, CHECKS_KIND, DELETION_KIND, WAL_RECORD_KIND, CONTINUITY_KIND, SAMPLE_KIND,
                   RESTORE_TEST_KIND, DRILL_KIND, PRUNE_LOG_KIND, CHECKPOINT_KIND, SPOOL_KIND, RECORD_STATE_KIND]


def _encrypt_format_2(repo: Repository, keyring: Keyring, report: UpgradeReport) -> None:
    """Every MAC-sealed document rewritten encrypted (manifests first, each with its check record)."""
    keys = sorted((s.key for s in repo.list("") if s.key.endswith(".json") and s.key != REPOSITORY_MARKER
                   and not s.key.startswith(("locks/", "compliance-reports/"))),
                  key=lambda k: (not is_manifest_key(k), k))
    for key in keys:
        data = repo.get_bytes(key)
        if is_encrypted(data) or not _looks_sealed(data):
            continue  # done by an earlier run, or not a document (an object named *.json; a planted file)
        found = next(((kind, body) for kind in _FORMAT_2_KINDS
                      if (body := unseal_format_2(keyring, kind, key, data)) is not None), None)
        if found is None:
            report.refused[key] = (f"{key} fails authentication (edited, forged without the keys, or moved here); "
                                   "what to do: restore it from the off-site copy, or delete it (readers refuse it)")
            continue
        kind, body = found
        if kind == DOCUMENT_KIND:
            old_digest = hashlib.sha256(canonical(body)).hexdigest()
            manifest = Manifest.model_validate(keyed_manifest(keyring, body))
            _encrypt_check_record(repo, keyring, manifest, old_digest)
            repo.put_bytes(key, manifest.to_bytes(keyring), repo.locked_until(key))
            report.manifests_sealed.append(manifest.backup_id)
            continue
        body = _keyed_fingerprints(keyring, body)  # a WAL record's object
        if kind == CHECKS_KIND:  # its manifest is gone or was refused: the record names no manifest now
            body = {**body, "version": 3, "manifest_digest": keyring.fingerprint(str(body.get("manifest_digest")))}
        repo.put_bytes(key, seal(keyring, kind, key, body), repo.locked_until(key))
        report.documents_sealed += 1


def _looks_sealed(data: bytes) -> bool:
    try:
        return isinstance(document := json.loads(data), dict) and "seal" in document
    except ValueError:
        return False


def _encrypt_check_record(repo: Repository, keyring: Keyring, manifest: Manifest, old_digest: str) -> None:
    """The backup's format 2 check record, encrypted and naming the converted manifest when it named this one."""
    key = checks_key(manifest.backup_id)
    if repo.size(key) is None or is_encrypted(data := repo.get_bytes(key)):
        return
    body = unseal_format_2(keyring, CHECKS_KIND, key, data)
    if body is None:
        return  # refused when the loop reaches it
    named = manifest.fingerprint(keyring) if body.get("manifest_digest") == old_digest else \
        keyring.fingerprint(str(body.get("manifest_digest")))
    repo.put_bytes(key, seal(keyring, CHECKS_KIND, key, {**body, "version": 3, "manifest_digest": named}))


def _keyed_fingerprints(keyring: Keyring, value: Any) -> Any:
    """`value` with every object record's bare `plaintext_sha256` keyed (Keyring.fingerprint)."""
    if isinstance(value, dict):
        return {k: keyring.fingerprint(v) if k == "plaintext_sha256" and is_sha256(v) else
                _keyed_fingerprints(keyring, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_keyed_fingerprints(keyring, item) for item in value]
    return value


def keyed_manifest(keyring: Keyring, body: dict[str, Any]) -> dict[str, Any]:
    """A manifest body of bare SHA-256 sums as version 4: every string equal to an object's content SHA-256 (its
    `plaintext_sha256`, a table's `sha256`, a lock file's) becomes that object's keyed fingerprint."""
    fingerprints = {str(r["plaintext_sha256"]): keyring.fingerprint(str(r["plaintext_sha256"]))
                    for r in body.get("objects", []) if isinstance(r, dict) and is_sha256(r.get("plaintext_sha256"))}

    def keyed(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: keyed(v) for k, v in value.items()}
        if isinstance(value, list):
            return [keyed(item) for item in value]
        return fingerprints.get(value, value) if isinstance(value, str) else value

    return {**keyed(body), "source": keyed_facts(keyring, keyed(body.get("source", {}))), "version": MANIFEST_VERSION}


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


def _seal_manifest(repo: Repository, keyring: Keyring, key: str, report: UpgradeReport,
                   trail: _TrailWitness) -> None:
    data = repo.get_bytes(key)
    if is_encrypted(data):
        return
    try:
        manifest = authenticate_legacy_manifest(repo, keyring, key, legacy_manifest(data, key))
    except RegalError as exc:
        report.refused[key] = exc.message + (f"; what to do: {exc.hint}" if exc.hint else "")
        return
    repo.put_bytes(key, manifest.to_bytes(keyring), manifest.locked_until)
    report.manifests_sealed.append(manifest.backup_id)
    record_key = checks_key(manifest.backup_id)
    if repo.size(record_key) is not None:
        try:
            record = None if is_encrypted(raw := repo.get_bytes(record_key)) else json.loads(raw)
        except ValueError:
            record = None
        if is_encrypted(raw):
            return
        if not isinstance(record, dict):
            report.refused[record_key] = f"{record_key} is not valid JSON; what to do: `regal-backup verify " \
                                         f"{manifest.backup_id}` checks the backup again"
        else:  # the record checked this manifest: it is now tied to it
            if (why := trail.vouch_checks(manifest.backup_id, record)) is not None:
                report.refused[record_key] = (f"{why}; what to do: `regal-backup verify {manifest.backup_id}` "
                                              "checks the backup again (until then it counts as unchecked)")
                return
            write_document(repo, keyring, CHECKS_KIND, record_key,
                           {**record, "version": 3, "manifest_digest": manifest.fingerprint(keyring)})


def authenticate_legacy_manifest(repo: Repository, keyring: Keyring, key: str, body: dict[str, Any]) -> Manifest:
    """A version 2 manifest sealed as the current version, once what it says is shown true by what a keyless
    writer cannot make: every object it names authenticates under its backup id and name with the recorded key
    id, SHA-256 sums and sizes, and every fact it ties to an object (`object` + `sha256`) matches that object's
    content (a packed table's: its extent, `offset` + `length`).
    RegalError naming the file otherwise."""
    hint = "it stays unsealed (DAMAGED); restore it from the off-site copy or investigate who wrote it"
    try:
        manifest = Manifest.model_validate({**body, "version": MANIFEST_VERSION})
    except ValidationError as exc:
        raise RegalError(f"{key} is incomplete ({exc.error_count()} problem(s))", hint) from None
    if manifest_key(manifest.target, manifest.backup_id) != key:
        raise RegalError(f"{key} describes backup {manifest.backup_id}, stored elsewhere", hint)
    if not manifest.objects:
        raise RegalError(f"{key} names no object: nothing vouches for it", hint)
    contents = {record.name: record.plaintext_sha256 for record in manifest.objects}  # bare, as format 2 wrote
    facts = list(_object_facts(manifest.source))
    extents: dict[str, dict[tuple[Any, Any], Any]] = {}  # a packed table's (offset, length) in its object: SHA-256
    for fact in facts:
        if isinstance(fact.get("offset"), int) and isinstance(fact.get("length"), int):
            extents.setdefault(str(fact["object"]), {})[(fact["offset"], fact["length"])] = hashlib.sha256()
    for record in manifest.objects:
        if not record.key.startswith(backup_prefix(manifest.target, manifest.backup_id)):
            raise RegalError(f"{key} names object {record.key}, outside its backup", hint)
    keyed = Manifest.model_validate(keyed_manifest(keyring, manifest.model_dump(mode="json")))
    for record in keyed.objects:  # each read once: authenticated, and its packed tables' extents hashed
        try:
            read_stream(repo, record, keyring=keyring, backup_id=manifest.backup_id,
                        sink=_extent_hasher(extents.get(record.name, {})))
        except RegalError as exc:
            raise RegalError(f"{key} is not borne out by its objects: {exc.message}", hint) from None
    for fact in facts:
        in_object = extents.get(str(fact["object"]), {})
        extent = (fact.get("offset"), fact.get("length"))
        held = in_object[extent].hexdigest() if extent in in_object else contents.get(str(fact["object"]))
        if held != fact["sha256"]:
            raise RegalError(f"{key} says object {fact['object']} holds content of SHA-256 {fact['sha256']}, "
                             "which is not what that object holds (its entries were swapped or edited)", hint)
    return keyed


def _extent_hasher(hashers: dict[tuple[Any, Any], Any]) -> Callable[[bytes], None] | None:
    """A sink feeding each (offset, length) extent of an object's plaintext to its hasher."""
    position = 0

    def sink(chunk: bytes) -> None:
        nonlocal position
        start, end = position, position + len(chunk)
        position = end
        for (offset, length), digest in hashers.items():
            low, high = max(offset, start), min(offset + length, end)
            if high > low:
                digest.update(chunk[low - start:high - start])

    return sink if hashers else None


def _object_facts(value: Any) -> Iterator[dict[str, Any]]:
    """Every mapping in a manifest's source facts that ties a fact to an object by its content (a table's rows)."""
    if isinstance(value, dict):
        if isinstance(value.get("object"), str) and isinstance(value.get("sha256"), str):
            yield value
        for item in value.values():
            yield from _object_facts(item)
    elif isinstance(value, list):
        for item in value:
            yield from _object_facts(item)


_NO_ROUTE = {
    SPOOL_KIND: "an audit event spooled before the upgrade: nothing but the file itself says it happened; "
                "what to do: it joins the audit trail only as the record of its refusal (its name, size and "
                "SHA-256, with the next event); if it was genuine, note what it says in the trail by hand",
    SAMPLE_KIND: "a restore sample: nothing but the file itself says which backups were drawn; what to do: "
                 "delete it, and the next restore-test schedule draws this month again (recorded, with its seed)",
}
_NO_TRAIL = "; what to do: delete it if you do not need it (readers refuse it), or keep it for investigation"


def _seal_document(repo: Repository, keyring: Keyring, kind: str, key: str, report: UpgradeReport,
                   trail: _TrailWitness) -> None:
    data = repo.get_bytes(key)
    if is_encrypted(data):
        return
    try:
        body = json.loads(data)
    except ValueError:
        report.refused[key] = f"{key} is not valid JSON" + _NO_TRAIL
        return
    if not isinstance(body, dict) or "seal" in body:
        return
    if kind in _NO_ROUTE:
        report.refused[key] = f"{key} is {_NO_ROUTE[kind]}"
        return
    if (why := trail.vouch(kind, key, body, data)) is not None:
        report.refused[key] = why + _NO_TRAIL
        return
    write_document(repo, keyring, kind, key, body)
    report.documents_sealed += 1


@dataclass
class _TrailWitness:
    """What the audit trail (hash-chained, outside the repository) recorded, to vouch for unsealed documents."""

    events: list[AuditEvent] | None  # None: no trail, or it cannot be read
    location: str

    @classmethod
    def read(cls, policy: Policy, repo: Repository, keyring: Keyring) -> _TrailWitness:
        if policy.audit is None:
            return cls(None, repo.location)
        try:
            return cls(AuditTrail(policy, repo, keyring).events(), repo.location)
        except RegalError:
            return cls(None, repo.location)

    def _of(self, event_type: str, resource: str | None = None) -> list[tuple[AuditEvent, dict[str, Any]]]:
        return [(e, json.loads(e.details)) for e in self.events or []
                if e.event_type == event_type and (resource is None or e.resource == resource)]

    @property
    def upgraded_to(self) -> int:
        """The newest format the trail saw this repository upgraded to (or opened as by upgrade); 0: none."""
        return max([int(d.get("format") or (2 if "manifests_sealed" in d else 0))
                    for e, d in self._of("repository_upgrade", self.location) if e.outcome == "success"], default=0)

    def vouch_checks(self, backup_id: str, record: dict[str, Any]) -> str | None:
        """None when the trail's newest verification of the backup recorded these outcomes; else why not."""
        key = checks_key(backup_id)
        if self.events is None:
            return f"{key}: there is no audit trail to vouch for this check record"
        found = self._of("verification", backup_id)
        if not found:
            return f"{key}: the audit trail records no verification of {backup_id}"
        details = found[-1][1]
        outcomes = {str(o.get("name")): o.get("passed") for o in record.get("outcomes", []) if isinstance(o, dict)}
        if details.get("checks") != outcomes:
            return f"{key} does not say what the audit trail's newest verification of {backup_id} recorded"
        return None

    def vouch(self, kind: str, key: str, body: dict[str, Any], data: bytes) -> str | None:
        """None when the trail recorded this document as it is; else why it cannot vouch for it."""
        if self.events is None:
            return f"{key}: there is no audit trail to vouch for it"
        if kind == CHECKPOINT_KIND:
            if any(e.seq == body.get("seq") and e.hash == body.get("hash") for e in self.events):
                return None
            return f"{key} is not a head the audit trail ever had"
        if kind == PRUNE_LOG_KIND:
            for _, details in self._of("prune"):
                if details.get("log") == key and details.get("log_sha256") in (None, hashlib.sha256(data).hexdigest()):
                    return None
            return f"{key}: the audit trail records no prune that wrote this log"
        if kind == DRILL_KIND:
            for event, details in self._of("dr_drill", str(body.get("drill_id"))):
                if (event.outcome == ("success" if body.get("passed") else "failure")
                        and details.get("rto_seconds") == _rounded(body.get("rto_seconds"))):
                    return None
            return f"{key}: the audit trail records no such drill"
        if kind == RESTORE_TEST_KIND:
            for _, details in self._of("restore_test", str(body.get("backup_id"))):
                if (details.get("validation_passed") == body.get("validation_passed")
                        and details.get("rto_seconds") == _rounded(body.get("rto_seconds"))):
                    return None
            return f"{key}: the audit trail records no such restore test"
        return f"{key}: nothing vouches for a document of kind {kind}"


def _rounded(value: Any) -> Any:
    return round(value, 3) if isinstance(value, int | float) else value
