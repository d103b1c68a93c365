"""Encrypted documents: every JSON document in the repository (manifests, check records, WAL records, samples,
spool events, the marker, ...) is encrypted and authenticated with the keyset's document keys (Tink AEAD,
AES256-GCM), bound to its identity. Nobody without the keys can read it, and none can change it unseen.

Stored bytes: `RGLD`, the document format byte (1), then the Tink AEAD ciphertext of the canonical JSON of the
body (sorted keys, no spaces, UTF-8; the body carries its own `format` and `version`), with the associated data
`regal-backup/document/v2` NUL kind NUL the document's key in the repository. So a document that is edited,
forged without the keys, copied over another backup's, moved to another path or given to a reader of another
kind fails, and the reader names the file. Encryption does not stop an old valid document from being put back
(rollback): the readers that care compare with what cannot be rewound (the key history, the audit trail, the
ledger versions recorded in manifests); docs/formats.md has the threat model.

Format 2 repositories stored documents in clear JSON with a MAC (`seal`, scheme `tink-mac/document-v1`):
`unseal_format_2` authenticates one, for `regal-backup upgrade` only; every reader refuses them.
"""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING, Any

from .errors import EncryptionKeyError, IntegrityError

if TYPE_CHECKING:
    from .crypto import Keyring
    from .storage import Repository

DOCUMENT_MAGIC = b"RGLD"
DOCUMENT_FORMAT = 1
_ASSOCIATED = b"regal-backup/document/v2"
SEAL = "seal"  # format 2: the MAC beside the clear body
SEAL_SCHEME = "tink-mac/document-v1"
_CONTEXT = b"regal-backup/document/v1"


def canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def associated_data(kind: str, key: str) -> bytes:
    return b"\x00".join([_ASSOCIATED, kind.encode(), key.encode()])


def is_encrypted(data: bytes) -> bool:
    """Whether stored bytes are an encrypted document (format 3), by their magic (nothing authenticated)."""
    return data[:len(DOCUMENT_MAGIC)] == DOCUMENT_MAGIC


def seal(keyring: Keyring, kind: str, key: str, body: dict[str, Any]) -> bytes:
    """The document as stored at `key`: its body encrypted, bound to (kind, key)."""
    return DOCUMENT_MAGIC + bytes([DOCUMENT_FORMAT]) + keyring.encrypt_document(canonical(body),
                                                                                associated_data(kind, key))


def unseal(keyring: Keyring, kind: str, key: str, data: bytes) -> dict[str, Any]:
    """The body of the document stored at `key`, once it decrypts and authenticates; IntegrityError naming the
    file."""
    if not is_encrypted(data):
        raise _clear_document(key, data)
    if data[len(DOCUMENT_MAGIC):len(DOCUMENT_MAGIC) + 1] != bytes([DOCUMENT_FORMAT]):
        raise EncryptionKeyError(f"{key} is a document of a newer format than this regal-backup reads",
                                 "upgrade regal-backup")
    plaintext = keyring.decrypt_document(data[len(DOCUMENT_MAGIC) + 1:], associated_data(kind, key))
    if plaintext is None:
        raise IntegrityError(f"{key} fails authentication: it was edited, forged without the keys, or moved here "
                             "from another place", "do not trust it; investigate who can write the repository")
    body = json.loads(plaintext)
    if not isinstance(body, dict):
        raise IntegrityError(f"{key} is not a regal-backup document", "remove the stray file")
    return body


def _clear_document(key: str, data: bytes) -> IntegrityError:
    """Why a document stored in clear is refused."""
    try:
        document = json.loads(data)
    except ValueError:
        return IntegrityError(f"{key} is not a regal-backup document (damaged or replaced)",
                              "do not trust it; restore the file from the off-site copy, or investigate")
    if not isinstance(document, dict):
        return IntegrityError(f"{key} is not a regal-backup document", "remove the stray file")
    if isinstance(document.get(SEAL), dict):
        return IntegrityError(f"{key} is stored in clear (repository format 2): it is not encrypted",
                              "run `regal-backup upgrade` once (it encrypts every document)")
    return IntegrityError(f"{key} carries no seal: it was not written by regal-backup with this keyset (or "
                          "predates authenticated repositories)",
                          "do not trust it; if the repository was never upgraded, run `regal-backup upgrade`")


def _signed(kind: str, key: str, body: dict[str, Any]) -> bytes:
    return b"\x00".join([_CONTEXT, kind.encode(), key.encode(), canonical(body)])


def seal_format_2(keyring: Keyring, kind: str, key: str, body: dict[str, Any]) -> bytes:
    """A document as format 2 stored it: clear JSON and a MAC over (kind, key, body). For upgrade's tests."""
    tag = keyring.compute_mac(_signed(kind, key, body))
    return json.dumps({**body, SEAL: {"scheme": SEAL_SCHEME, "mac": base64.b64encode(tag).decode()}},
                      indent=2, ensure_ascii=False).encode()


def unseal_format_2(keyring: Keyring, kind: str, key: str, data: bytes) -> dict[str, Any] | None:
    """The body of a format 2 document, when its MAC verifies as kind `kind` at `key`; else None."""
    try:
        document = json.loads(data)
    except ValueError:
        return None
    if not isinstance(document, dict) or not isinstance(seal_ := document.pop(SEAL, None), dict):
        return None
    try:
        tag = base64.b64decode(str(seal_.get("mac", "")), validate=True)
    except ValueError:
        return None
    if seal_.get("scheme") != SEAL_SCHEME or not keyring.verify_mac(tag, _signed(kind, key, document)):
        return None
    return document


def write_document(repo: Repository, keyring: Keyring, kind: str, key: str, body: dict[str, Any],
                   retain_until: Any = None) -> None:
    repo.put_bytes(key, seal(keyring, kind, key, body), retain_until)


def read_document(repo: Repository, keyring: Keyring, kind: str, key: str) -> dict[str, Any]:
    return unseal(keyring, kind, key, repo.get_bytes(key))
