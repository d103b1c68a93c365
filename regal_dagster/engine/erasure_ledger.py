"""The GDPR erasure ledger as data: what it holds (salted hashes of erased subjects, per target), how it is
kept in the repository (encrypted with the backup keys like a backup object), and what re-applying it at a
restored destination found. Below the source kinds, which apply it (their `apply_erasures`); the verbs
that record erasures and re-apply them after every restore are engine/gdpr.py's."""

from __future__ import annotations

import hashlib
import io
import json
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any

import tink

from .crypto import Keyring, NonClosingWriter
from .errors import IntegrityError
from .layout import GDPR_LEDGER
from .storage import Repository

_LEDGER_CONTEXT = ("gdpr", "erasure-ledger")  # the associated data of its encryption


@dataclass
class Erasure:
    subject_hash: str
    target: str
    requested_at: str
    recorded_at: str
    reference: str = ""


@dataclass
class ErasureLedger:
    salt: str = field(default_factory=lambda: secrets.token_hex(16))
    erasures: list[Erasure] = field(default_factory=list)
    revision: int = 0  # one more with every change; every manifest records the revision it saw

    def hash(self, identifier: str) -> str:
        return hashlib.sha256((self.salt + identifier.strip().lower()).encode()).hexdigest()

    def for_target(self, target: str) -> list[Erasure]:
        return [e for e in self.erasures if e.target == target]


def load_ledger(repo: Repository, keyring: Keyring) -> ErasureLedger:
    if repo.size(GDPR_LEDGER) is None:
        return ErasureLedger()
    try:
        stream = keyring.decrypting_stream(io.BytesIO(repo.get_bytes(GDPR_LEDGER)), *_LEDGER_CONTEXT)
        body = json.loads(stream.read())
    except (tink.TinkError, ValueError):
        raise IntegrityError(f"{GDPR_LEDGER} fails authentication: it was edited, replaced or damaged",
                             "restore it from the off-site copy; erasures must not be lost") from None
    erasures = [Erasure(**e) for e in body["erasures"]]
    return ErasureLedger(body["salt"], erasures, body.get("revision", len(erasures)))


def save_ledger(repo: Repository, keyring: Keyring, ledger: ErasureLedger) -> None:
    body = json.dumps({"format": "regal-backup-erasure-ledger", "version": 2, "revision": ledger.revision,
                       "salt": ledger.salt, "erasures": [asdict(e) for e in ledger.erasures]}).encode()
    buffer = io.BytesIO()
    stream = keyring.encrypting_stream(NonClosingWriter(buffer), *_LEDGER_CONTEXT)
    stream.write(body)
    stream.close()
    repo.put_bytes(GDPR_LEDGER, buffer.getvalue())


@dataclass
class ErasureResult:
    subjects: int  # erasures in the ledger for this target
    rows_erased: dict[str, int]  # table -> rows deleted or anonymized
    still_present: dict[str, int]  # table -> rows that still match an erased subject (must be all zero)

    @property
    def ok(self) -> bool:
        return not any(self.still_present.values())

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}
