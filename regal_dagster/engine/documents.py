"""Sealed documents: every JSON document in the repository that decides what is restored, kept, deleted or
reported carries a MAC from the keyset's document keys, bound to its identity.

The MAC covers `regal-backup/document/v1`, the document's kind ("manifest", "checks", ...), its key in the
repository (which names its target and backup) and the canonical JSON of its body (sorted keys, no
spaces, UTF-8; the body carries its own `format` and `version`). So a document that is edited, forged
without the keys, copied over another backup's, moved to another path or given to a reader of another
kind fails, and the reader names the file. A MAC does not stop an old valid document from being put
back (rollback): the readers that care compare with what cannot be rewound (the key history, the audit
trail, the ledger versions recorded in manifests); docs/formats.md has the threat model.
"""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING, Any

from .errors import IntegrityError

if TYPE_CHECKING:
    from .crypto import Keyring
    from .storage import Repository

SEAL = "seal"
SEAL_SCHEME = "tink-mac/document-v1"
_CONTEXT = b"regal-backup/document/v1"


def canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _signed(kind: str, key: str, body: dict[str, Any]) -> bytes:
    return b"\x00".join([_CONTEXT, kind.encode(), key.encode(), canonical(body)])


def seal(keyring: Keyring, kind: str, key: str, body: dict[str, Any]) -> bytes:
    """The document as stored at `key`: its body and a seal over (kind, key, body)."""
    tag = keyring.compute_mac(_signed(kind, key, body))
    return json.dumps({**body, SEAL: {"scheme": SEAL_SCHEME, "mac": base64.b64encode(tag).decode()}},
                      indent=2, ensure_ascii=False).encode()


def unseal(keyring: Keyring, kind: str, key: str, data: bytes) -> dict[str, Any]:
    """The body of the document stored at `key`, once its seal holds; IntegrityError naming the file."""
    try:
        document = json.loads(data)
    except ValueError:
        raise IntegrityError(f"{key} is not valid JSON (damaged or replaced)",
                             "do not trust it; restore the file from the off-site copy, or investigate") from None
    if not isinstance(document, dict):
        raise IntegrityError(f"{key} is not a regal-backup document", "remove the stray file")
    seal_ = document.pop(SEAL, None)
    if not isinstance(seal_, dict) or seal_.get("scheme") != SEAL_SCHEME:
        raise IntegrityError(f"{key} carries no seal: it was not written by regal-backup with this keyset (or "
                             "predates authenticated repositories)",
                             "do not trust it; if the repository was never upgraded, run `regal-backup upgrade`")
    try:
        tag = base64.b64decode(str(seal_.get("mac", "")), validate=True)
    except ValueError:
        tag = b""
    if not keyring.verify_mac(tag, _signed(kind, key, document)):
        raise IntegrityError(f"{key} fails authentication: it was edited, forged without the keys, or moved here "
                             "from another place", "do not trust it; investigate who can write the repository")
    return document


def write_document(repo: Repository, keyring: Keyring, kind: str, key: str, body: dict[str, Any],
                   retain_until: Any = None) -> None:
    repo.put_bytes(key, seal(keyring, kind, key, body), retain_until)


def read_document(repo: Repository, keyring: Keyring, kind: str, key: str) -> dict[str, Any]:
    return unseal(keyring, kind, key, repo.get_bytes(key))
