"""Envelope encryption with Tink.

- Backups are encrypted with Tink streaming AEAD (AES256_GCM_HKDF_1MB). The keys live in a Tink keyset;
  its primary key encrypts new objects, older keys stay to read older backups (rotation).
- The keyset is stored encrypted by a master key: a Tink AES256-GCM key given in an environment
  variable or a 0600 file, or an AWS KMS key (Tink's AWS KMS integration, through boto3).
- Each stored object starts with a small header (magic, format version, key id) followed by the Tink
  ciphertext. The associated data binds the ciphertext to its backup id, object name and key id, so an
  object moved to another backup, renamed or relabelled with another key id fails authentication.
- Repository documents (manifests, check records, ...) are encrypted with Tink AEAD (AES256-GCM) from a third
  keyset in the same file, bound to their kind and key (engine/documents.py). A second keyset, of Tink MACs
  (HMAC-SHA256), keys the content fingerprints (`fingerprint`: never a bare SHA-256 of data in the
  repository) and authenticated format 2 documents (read by `upgrade`). Both are encrypted by the same master
  key, rotated with the object keys and never retired. docs/formats.md describes the formats.
"""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import stat
import struct
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import tink
from tink import aead, mac, secret_key_access, streaming_aead
from tink.proto import tink_pb2

from .errors import EncryptionKeyError, IntegrityError

if TYPE_CHECKING:
    from .settings import EncryptionConfig, MasterKeyConfig, PolicyView

aead.register()
mac.register()
streaming_aead.register()

STREAMING_TEMPLATE_NAME = "AES256_GCM_HKDF_1MB"
OBJECT_MAGIC = b"RGLB"
OBJECT_FORMAT_VERSION = 1
OBJECT_HEADER = struct.Struct(">4sBI")  # magic, format version, key id
KEYSET_FILE_FORMAT = "regal-backup-keyset"
_KEYSET_AAD = b"regal-backup/keyset/v1"
_KEYSET_AAD_V3 = b"regal-backup/keyset/v3"
_KEYSET_AAD_V4 = b"regal-backup/keyset/v4"
_KEYSET_AAD_V5 = b"regal-backup/keyset/v5"
KEYSET_VERSION = 5
AEAD_TEMPLATE_NAME = "AES256_GCM"
AEAD_TEMPLATE = getattr(aead.aead_key_templates, AEAD_TEMPLATE_NAME)
_FINGERPRINT_CONTEXT = b"regal-backup/fingerprint/v1"
MAC_TEMPLATE_NAME = "HMAC_SHA256_256BITTAG"
MAC_TEMPLATE = getattr(mac.mac_key_templates, MAC_TEMPLATE_NAME)


def _streaming_template():
    return getattr(streaming_aead.streaming_aead_key_templates, STREAMING_TEMPLATE_NAME)


def object_associated_data(backup_id: str, object_name: str, key_id: int) -> bytes:
    return b"\x00".join([b"regal-backup/object/v1", backup_id.encode(), object_name.encode(), str(key_id).encode()])


# --- master key --------------------------------------------------------------------------------

def generate_master_key() -> str:
    """A new master key as one line of text (base64 of a Tink AES256-GCM keyset)."""
    handle = tink.new_keyset_handle(aead.aead_key_templates.AES256_GCM)
    cleartext = tink.json_proto_keyset_format.serialize(handle, secret_key_access.TOKEN)
    return base64.b64encode(cleartext.encode()).decode()


def write_master_key_file(path: Path, master_key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(master_key + "\n")


def _master_key_text(config: MasterKeyConfig, policy: PolicyView, given: str | None) -> str:
    if given:
        return given.strip()
    if config.env:
        value = os.environ.get(config.env)
        if not value:
            raise EncryptionKeyError(
                f"the master key environment variable {config.env} is not set",
                f"export {config.env} from your secret store before running (regal-backup init printed it)",
            )
        return value.strip()
    assert config.file
    path = policy.resolve_path(config.file)
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except FileNotFoundError:
        raise EncryptionKeyError(f"the master key file {path} does not exist",
                                 "restore it from your secret store, or fix encryption.master_key.file") from None
    except PermissionError:
        raise EncryptionKeyError(f"the master key file {path} cannot be read", "run as the backup user") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise EncryptionKeyError(f"the master key file {path} is readable by others",
                                 f"chmod 600 {path}")
    return text


def master_aead(config: MasterKeyConfig, policy: PolicyView, master_key: str | None = None) -> aead.Aead:
    """The AEAD that opens the keyset. `master_key` overrides where the policy says the key is."""
    if config.kms_key_uri:
        return _kms_aead(config)
    text = _master_key_text(config, policy, master_key)
    try:
        cleartext = base64.b64decode(text, validate=True).decode()
        handle = tink.json_proto_keyset_format.parse(cleartext, secret_key_access.TOKEN)
        return handle.primitive(aead.Aead)
    except (ValueError, tink.TinkError, UnicodeDecodeError):
        source = f"${config.env}" if config.env else str(policy.resolve_path(config.file or ""))
        raise EncryptionKeyError(f"the master key in {source} is not a valid key",
                                 "it must be the one line regal-backup init generated") from None


def _kms_aead(config: MasterKeyConfig) -> aead.Aead:
    import boto3
    from tink.integration import awskms

    uri = config.kms_key_uri or ""
    region = config.kms_region or uri.removeprefix("aws-kms://").split(":")[3]
    client = boto3.client("kms", region_name=region, endpoint_url=config.kms_endpoint_url)
    return awskms.new_client(boto3_client=client, key_uri=uri).get_aead(uri)


# --- keyset --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KeyInfo:
    """A key's life: created, primary (encrypting new objects, or sealing new documents) from
    `primary_since` until the next rotation, retired (its material destroyed) once nothing uses it."""

    key_id: int
    created_at: str | None
    primary_since: str | None = None
    primary_until: str | None = None
    retired_at: str | None = None
    primary: bool = False

    def to_json(self) -> dict[str, object]:
        return {"created_at": self.created_at, "primary_since": self.primary_since,
                "primary_until": self.primary_until, "retired_at": self.retired_at}


@dataclass(frozen=True)
class Keys:
    """One Tink keyset (of one primitive) and the dates of every key it ever held."""

    handle: tink.KeysetHandle
    history: dict[int, KeyInfo]

    @classmethod
    def new(cls, template: object) -> Keys:
        handle = tink.new_keyset_handle(template)
        key_id, now = handle.keyset_info().primary_key_id, _now()
        return cls(handle, {key_id: KeyInfo(key_id, created_at=now, primary_since=now)})

    @property
    def primary_key_id(self) -> int:
        return int(self.handle.keyset_info().primary_key_id)

    @property
    def key_ids(self) -> frozenset[int]:
        return frozenset(k.key_id for k in self.handle.keyset_info().key_info)

    def rotated(self, template: object) -> Keys:
        """A new key added as primary; the old keys stay (to read older objects, to verify older documents)."""
        keyset = self._cleartext()
        fresh = tink_pb2.Keyset.FromString(tink.proto_keyset_format.serialize(
            tink.new_keyset_handle(template), secret_key_access.TOKEN))
        key = fresh.key[0]
        while key.key_id in self.history:  # ids are random 32-bit: a clash with a retired id is unlikely
            key.key_id = (key.key_id + 1) % 2**32
        keyset.key.append(key)
        keyset.primary_key_id = key.key_id
        now = _now()
        history = {**self.history, key.key_id: KeyInfo(key.key_id, created_at=now, primary_since=now),
                   self.primary_key_id: replace(self.history[self.primary_key_id], primary_until=now)}
        return Keys(self._handle_of(keyset), history)

    def without(self, key_id: int) -> Keys:
        """A key's material destroyed; its dates stay in the history as retired."""
        keyset = self._cleartext()
        kept = [k for k in keyset.key if k.key_id != key_id]
        del keyset.key[:]
        keyset.key.extend(kept)
        return Keys(self._handle_of(keyset), {**self.history, key_id: replace(self.history[key_id], retired_at=_now())})

    def only(self, key_id: int) -> Keys:
        """A keyset of this one key (primary): to compute with a key that is not the primary."""
        keyset = self._cleartext()
        kept = [k for k in keyset.key if k.key_id == key_id]
        del keyset.key[:]
        keyset.key.extend(kept)
        keyset.primary_key_id = key_id
        return Keys(self._handle_of(keyset), {key_id: self.history[key_id]})

    def _cleartext(self) -> tink_pb2.Keyset:
        return tink_pb2.Keyset.FromString(tink.proto_keyset_format.serialize(self.handle, secret_key_access.TOKEN))

    @staticmethod
    def _handle_of(keyset: tink_pb2.Keyset) -> tink.KeysetHandle:
        return tink.proto_keyset_format.parse(keyset.SerializeToString(), secret_key_access.TOKEN)


@dataclass(frozen=True)
class KeysetFile:
    """Where a keyring was read from, and the master key that opens it: enough to read it again."""

    path: Path
    master: aead.Aead


class Keyring:
    """The keys, decrypted in memory: the streaming AEAD keyset (backup objects; the primary key encrypts),
    the document AEAD keyset (repository documents: manifests, check records, ...; the primary encrypts) and
    the MAC keyset (content fingerprints; format 2 documents' seals).

    `repository_format`: the repository format this keyset has opened (authenticated with the keyset, so a
    repository writer without the keys cannot lower it); a marker saying less is a downgrade. None: a keyset
    written before it was recorded (engine/repository_format.py records it on the next open).

    `audit_anchors`: per repository (its marker's `repository_id`), the newest audit checkpoint this keyset
    wrote there ({"seq", "hash", "checkpoints": how many authentic checkpoints up to it the repository held}),
    authenticated like the format: deleting or rolling back checkpoint files cannot hide from it
    (engine/audit.py)."""

    def __init__(self, stream: Keys, macs: Keys | None, origin: KeysetFile | None = None,
                 repository_format: int | None = None, aeads: Keys | None = None,
                 audit_anchors: dict[str, dict[str, object]] | None = None):
        self.stream, self.macs, self.aeads, self.origin = stream, macs, aeads, origin
        self.repository_format, self.audit_anchors = repository_format, dict(audit_anchors or {})
        self._primitive = stream.handle.primitive(streaming_aead.StreamingAead)
        self._mac = macs.handle.primitive(mac.Mac) if macs is not None else None
        self._aead = aeads.handle.primitive(aead.Aead) if aeads is not None else None
        self._macs_by_key: dict[int, mac.Mac] = {}
        self.primary_key_id: int = stream.primary_key_id
        self.key_ids: frozenset[int] = stream.key_ids
        self.history = stream.history  # every key this keyset ever held, retired ones too

    def all_keys(self) -> list[KeyInfo]:
        """Every key ever held, oldest first; `primary` marks the one new objects use."""
        return sorted((replace(k, primary=k.key_id == self.primary_key_id) for k in self.history.values()),
                      key=lambda k: (k.created_at or "", k.key_id))

    def _changed(self, **changes: object) -> Keyring:
        fields: dict[str, object] = {"stream": self.stream, "macs": self.macs, "origin": self.origin,
                                     "repository_format": self.repository_format, "aeads": self.aeads,
                                     "audit_anchors": self.audit_anchors, **changes}
        return Keyring(**fields)  # type: ignore[arg-type]

    def rotated(self) -> Keyring:
        """A new primary key for objects, one for documents and one for fingerprints; older keys stay to read
        (and to verify) what they wrote."""
        macs = self.macs.rotated(MAC_TEMPLATE) if self.macs is not None else Keys.new(MAC_TEMPLATE)
        aeads = self.aeads.rotated(AEAD_TEMPLATE) if self.aeads is not None else Keys.new(AEAD_TEMPLATE)
        return self._changed(stream=self.stream.rotated(_streaming_template()), macs=macs, aeads=aeads)

    def without(self, key_id: int) -> Keyring:
        """The object key `key_id` destroyed (document and MAC keys are kept: old documents stay readable)."""
        return self._changed(stream=self.stream.without(key_id))

    def with_document_keys(self) -> Keyring:
        """This keyring with MAC and document AEAD keysets, made when the keyset predates them (upgrade)."""
        if self.macs is not None and self.aeads is not None:
            return self
        return self._changed(macs=self.macs or Keys.new(MAC_TEMPLATE), aeads=self.aeads or Keys.new(AEAD_TEMPLATE))

    def with_repository_format(self, version: int) -> Keyring:
        """This keyring remembering that it opened a repository of format `version` (never lowered)."""
        return self._changed(repository_format=max(version, self.repository_format or 0))

    def with_audit_anchor(self, repository_id: str, anchor: dict[str, object]) -> Keyring:
        """This keyring remembering a newer audit checkpoint of a repository (the caller checks it is newer)."""
        return self._changed(audit_anchors={**self.audit_anchors, repository_id: dict(anchor)})

    def reload(self) -> Keyring:
        """The keyset as it is on disk now (another process may have rotated or retired a key)."""
        if self.origin is None:
            return self
        return read_keyset(self.origin.path, self.origin.master)

    # --- documents ---------------------------------------------------------------------------------

    def _missing(self, what: str) -> EncryptionKeyError:
        where = f" {self.origin.path}" if self.origin else ""
        return EncryptionKeyError(f"the keyset{where} has no {what} keys: it was made before the repository "
                                  "encrypted its documents", "run `regal-backup upgrade` once")

    def _document_mac(self) -> mac.Mac:
        if self._mac is None:
            raise self._missing("MAC")
        return self._mac

    def compute_mac(self, data: bytes) -> bytes:
        return bytes(self._document_mac().compute_mac(data))

    def verify_mac(self, tag: bytes, data: bytes) -> bool:
        try:
            self._document_mac().verify_mac(tag, data)
            return True
        except tink.TinkError:
            return False

    def encrypt_document(self, plaintext: bytes, associated_data: bytes) -> bytes:
        """Tink AEAD ciphertext (5-byte key prefix, IV, ciphertext, tag) under the primary document key."""
        if self._aead is None:
            raise self._missing("document encryption")
        return bytes(self._aead.encrypt(plaintext, associated_data))

    def decrypt_document(self, ciphertext: bytes, associated_data: bytes) -> bytes | None:
        """The plaintext, or None when it does not authenticate (edited, forged, moved, or another keyset's)."""
        if self._aead is None:
            raise self._missing("document encryption")
        try:
            return bytes(self._aead.decrypt(ciphertext, associated_data))
        except tink.TinkError:
            return None

    # --- content fingerprints -------------------------------------------------------------------------

    def fingerprint(self, sha256_hex: str, like: str | None = None) -> str:
        """The keyed fingerprint of content whose SHA-256 is `sha256_hex`: hex of a Tink MAC tag (key prefix
        and HMAC-SHA256) over the digest. Deterministic for one key; `like`: computed with the key of that
        fingerprint (to compare with it), else the primary MAC key. Without the keys it says nothing."""
        message = _FINGERPRINT_CONTEXT + b"\x00" + sha256_hex.encode()
        key_id = _fingerprint_key_id(like) if like else None
        if key_id is None or self.macs is None or key_id not in self.macs.key_ids:
            return self.compute_mac(message).hex()
        if key_id not in self._macs_by_key:
            self._macs_by_key[key_id] = self.macs.only(key_id).handle.primitive(mac.Mac)
        return bytes(self._macs_by_key[key_id].compute_mac(message)).hex()

    def fingerprint_matches(self, fingerprint: str, sha256_hex: str) -> bool:
        """Whether `fingerprint` is the keyed fingerprint of content whose SHA-256 is `sha256_hex`."""
        try:
            tag = bytes.fromhex(fingerprint)
        except ValueError:
            return False
        return self.verify_mac(tag, _FINGERPRINT_CONTEXT + b"\x00" + sha256_hex.encode())

    # --- objects -----------------------------------------------------------------------------------

    def encrypting_stream(self, destination: BinaryIO | io.RawIOBase, backup_id: str, object_name: str) -> BinaryIO:
        """Writes the object header, then returns a stream that encrypts into `destination`."""
        key_id = self.primary_key_id
        destination.write(OBJECT_HEADER.pack(OBJECT_MAGIC, OBJECT_FORMAT_VERSION, key_id))
        return self._primitive.new_encrypting_stream(
            destination, object_associated_data(backup_id, object_name, key_id))

    def decrypting_stream(self, source: BinaryIO | io.RawIOBase, backup_id: str, object_name: str,
                          expected_key_id: int | None = None) -> BinaryIO:
        """Reads and checks the header, then returns a stream of authenticated plaintext."""
        header = _read_exactly(source, OBJECT_HEADER.size)
        if len(header) < OBJECT_HEADER.size or header[:4] != OBJECT_MAGIC:
            raise IntegrityError(f"object {object_name} of backup {backup_id} is not in the encrypted "
                                 "regal-backup format", "the object was replaced or is not a backup")
        _, version, key_id = OBJECT_HEADER.unpack(header)
        if version != OBJECT_FORMAT_VERSION:
            raise EncryptionKeyError(f"object {object_name} has object format {version}; this version reads "
                                     f"{OBJECT_FORMAT_VERSION}", "upgrade regal-backup")
        if expected_key_id is not None and key_id != expected_key_id:
            raise IntegrityError(f"object {object_name} of backup {backup_id} says key {key_id} but its "
                                 f"manifest says key {expected_key_id}", "the object was tampered with")
        if key_id not in self.key_ids:
            raise EncryptionKeyError(
                f"object {object_name} of backup {backup_id} was encrypted with key {key_id}, "
                "which this keyset does not hold",
                "use the keyset (and master key) that was current when the backup was made")
        return self._primitive.new_decrypting_stream(
            source, object_associated_data(backup_id, object_name, key_id))


def _fingerprint_key_id(fingerprint: str) -> int | None:
    """The MAC key id in a fingerprint's Tink prefix (0x01, 4-byte key id), or None."""
    try:
        tag = bytes.fromhex(fingerprint)
    except ValueError:
        return None
    return int.from_bytes(tag[1:5], "big") if len(tag) > 5 and tag[0] == 1 else None


def _read_exactly(source: BinaryIO | io.RawIOBase, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = source.read(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _keyset_path(config: EncryptionConfig, policy: PolicyView) -> Path:
    return policy.resolve_path(config.keyset)


def create_keyset(policy: PolicyView) -> Keyring:
    """Create a new keyset (one object key, one document key), encrypt it with the master key and write it."""
    path = _keyset_path(policy.encryption, policy)
    if path.exists():
        raise EncryptionKeyError(f"a keyset already exists at {path}", "keep it: backups need it to be read")
    origin = KeysetFile(path, master_aead(policy.encryption.master_key, policy))
    keyring = Keyring(Keys.new(_streaming_template()), Keys.new(MAC_TEMPLATE), origin,
                      aeads=Keys.new(AEAD_TEMPLATE))
    return save_keyring(keyring)


def load_keyring(policy: PolicyView, master_key: str | None = None) -> Keyring:
    return read_keyset(_keyset_path(policy.encryption, policy),
                       master_aead(policy.encryption.master_key, policy, master_key))


def read_keyset(path: Path, master: aead.Aead) -> Keyring:
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise EncryptionKeyError(f"the keyset file {path} does not exist",
                                 "restore it from your key backup, or fix encryption.keyset in the policy") from None
    except ValueError:
        raise EncryptionKeyError(f"the keyset file {path} is not valid JSON",
                                 "restore it from your key backup") from None
    if document.get("format") != KEYSET_FILE_FORMAT:
        raise EncryptionKeyError(f"{path} is not a regal-backup keyset", "fix encryption.keyset in the policy")
    version = document.get("version")
    if version == 1:  # key dates outside the authenticated data
        history = {int(k): KeyInfo(int(k), created_at=v) for k, v in document.get("key_created_at", {}).items()}
        aad, mac_history = _KEYSET_AAD, None
    elif version == 2:
        history = {int(k): KeyInfo(int(k), **v) for k, v in document.get("keys", {}).items()}
        aad, mac_history = _keyset_aad_v2(history), None
    else:
        history = {int(k): KeyInfo(int(k), **v) for k, v in document.get("keys", {}).items()}
        mac_history = {int(k): KeyInfo(int(k), **v) for k, v in document.get("mac_keys", {}).items()}
        aad = b""  # each part has its own
    repository_format = document.get("repository_format") if version in (4, 5) else None
    audit_anchors = document.get("audit_anchors") if version == 5 else None
    aead_history = ({int(k): KeyInfo(int(k), **v) for k, v in document.get("aead_keys", {}).items()}
                    if version == 5 else None)

    def opened(field: str, part: bytes) -> tink.KeysetHandle:
        if version == 5:
            part_aad = _keyset_aad_v5(part, history, mac_history or {}, aead_history or {}, repository_format,
                                      audit_anchors)
        else:
            part_aad = _keyset_aad_v3(part, history, mac_history or {}, repository_format, version)
        return tink.json_proto_keyset_format.parse_encrypted(document[field], master, part_aad)

    try:
        handle = (opened("encrypted_keyset", b"streaming-aead") if mac_history is not None else
                  tink.json_proto_keyset_format.parse_encrypted(document["encrypted_keyset"], master, aad))
        macs = Keys(opened("encrypted_mac_keyset", b"mac"), mac_history) if mac_history is not None else None
        aeads = (Keys(opened("encrypted_aead_keyset", b"document-aead"), aead_history)
                 if aead_history is not None else None)
    except (tink.TinkError, KeyError):
        raise EncryptionKeyError(
            f"the master key does not open the keyset {path} (wrong master key, or its key dates were edited)",
            "use the master key that was created with this keyset, and the keyset file as regal-backup wrote it"
        ) from None
    for key_id in handle_key_ids(handle) - history.keys():
        history[key_id] = KeyInfo(key_id, created_at=None)
    return Keyring(Keys(handle, history), macs, KeysetFile(path, master),
                   int(repository_format) if isinstance(repository_format, int) else None, aeads,
                   audit_anchors if isinstance(audit_anchors, dict) else {})


def handle_key_ids(handle: tink.KeysetHandle) -> set[int]:
    return {k.key_id for k in handle.keyset_info().key_info}


def _canonical_dates(history: dict[int, KeyInfo]) -> dict[str, object]:
    return {str(k): v.to_json() for k, v in sorted(history.items())}


def _keyset_aad_v2(history: dict[int, KeyInfo]) -> bytes:
    """The key dates are authenticated with the keyset: editing them (to dodge the cryptoperiod) breaks it."""
    return _KEYSET_AAD + b"\x00" + json.dumps(_canonical_dates(history), sort_keys=True, separators=(",", ":")).encode()


def _keyset_aad_v3(part: bytes, history: dict[int, KeyInfo], mac_history: dict[int, KeyInfo],
                   repository_format: object = None, version: object = 3) -> bytes:
    """Versions 3 and 4: both keysets' dates, in the associated data of both encrypted keysets (and which part it
    is); from version 4 the repository format the keyset has opened too (a repository writer cannot lower it)."""
    dates: dict[str, object] = {"keys": _canonical_dates(history), "mac_keys": _canonical_dates(mac_history)}
    if version == 4:
        dates["repository_format"] = repository_format
    return b"\x00".join([_KEYSET_AAD_V4 if version == 4 else _KEYSET_AAD_V3, part,
                         json.dumps(dates, sort_keys=True, separators=(",", ":")).encode()])


def _keyset_aad_v5(part: bytes, history: dict[int, KeyInfo], mac_history: dict[int, KeyInfo],
                   aead_history: dict[int, KeyInfo], repository_format: object, audit_anchors: object) -> bytes:
    """Version 5: the three keysets' dates, the repository format and the audit anchors (a repository writer can
    neither lower the format nor roll back the audit checkpoints unseen), in the associated data of each part."""
    dates = {"keys": _canonical_dates(history), "mac_keys": _canonical_dates(mac_history),
             "aead_keys": _canonical_dates(aead_history), "repository_format": repository_format,
             "audit_anchors": audit_anchors}
    return b"\x00".join([_KEYSET_AAD_V5, part, json.dumps(dates, sort_keys=True, separators=(",", ":")).encode()])


def save_keyring(keyring: Keyring) -> Keyring:
    """Write a new or changed keyset (rotation, retirement, upgrade) over the old one atomically, then read it
    back: returns the keyring as it is on disk. The caller holds the repository's keys lock."""
    if keyring.origin is None or keyring.macs is None or keyring.aeads is None:
        raise EncryptionKeyError("this keyring cannot be saved (it was not read from a keyset file)", "load it first")
    path, master, stream, macs = keyring.origin.path, keyring.origin.master, keyring.stream, keyring.macs
    aeads, repository_format = keyring.aeads, keyring.repository_format

    def aad(part: bytes) -> bytes:
        return _keyset_aad_v5(part, stream.history, macs.history, aeads.history, repository_format,
                              keyring.audit_anchors)

    document = {
        "format": KEYSET_FILE_FORMAT,
        "version": KEYSET_VERSION,
        "template": STREAMING_TEMPLATE_NAME,
        "primary_key_id": stream.primary_key_id,
        "keys": _canonical_dates(stream.history),
        "mac_template": MAC_TEMPLATE_NAME,
        "mac_primary_key_id": macs.primary_key_id,
        "mac_keys": _canonical_dates(macs.history),
        "aead_template": AEAD_TEMPLATE_NAME,
        "aead_primary_key_id": aeads.primary_key_id,
        "aead_keys": _canonical_dates(aeads.history),
        "repository_format": repository_format,
        "audit_anchors": keyring.audit_anchors,
        "encrypted_keyset": tink.json_proto_keyset_format.serialize_encrypted(stream.handle, master,
                                                                             aad(b"streaming-aead")),
        "encrypted_mac_keyset": tink.json_proto_keyset_format.serialize_encrypted(macs.handle, master, aad(b"mac")),
        "encrypted_aead_keyset": tink.json_proto_keyset_format.serialize_encrypted(aeads.handle, master,
                                                                                  aad(b"document-aead")),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(document, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    written = read_keyset(path, master)
    if ((written.stream.key_ids, written.macs and written.macs.key_ids, written.aeads and written.aeads.key_ids,
         written.repository_format, written.audit_anchors)
            != (stream.key_ids, macs.key_ids, aeads.key_ids, repository_format, keyring.audit_anchors)):
        raise EncryptionKeyError(f"the keyset {path} did not read back as written", "check the disk; keep the old "
                                 "keyset backup until a rotation reads back")
    return written


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class NonClosingWriter(io.RawIOBase):
    """Passes writes through and ignores close(): Tink closes its destination when it finishes."""

    def __init__(self, target: BinaryIO):
        self._target = target

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._target.write(data)
        return len(data)
