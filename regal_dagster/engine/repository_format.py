"""The repository's own marker, `regal-repository.json`: that a repository is here, and its format.

Format 3 (this version): every document in the repository is encrypted and authenticated (engine/documents.py),
the marker too, and content fingerprints are keyed. Format 2 repositories (documents in clear JSON, sealed with
a MAC) and format 1 ones (self-checksummed manifests, plain JSON documents, a plain marker) are read after
`regal-backup upgrade` (engine/upgrade.py) has converted them; until then every command says so.

A format is never lowered: the keyset remembers the newest format it has opened (authenticated with the
keys, engine/crypto.py), recorded at `init`, at `upgrade` and on the first open of a current repository by
a keyset that predates the record. A marker saying less than that is a downgrade (someone without the keys
rewrote it to have `upgrade` seal their forgeries) and is refused, `upgrade` included.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from .crypto import Keyring, save_keyring
from .documents import is_encrypted, unseal, write_document
from .errors import IntegrityError, RegalError, UsageError
from .layout import KEYS_LOCK, REPOSITORY_MARKER
from .storage import Repository
from .storage.base import ObjectMissingError

REPOSITORY_KIND = "repository"
MARKER_FORMAT = "regal-backup-repository"
FORMAT_VERSION = 3


class NoRepositoryError(UsageError):
    """No repository where the policy points: a wrong path, an unmounted volume, a new bucket."""

    def __init__(self, location: str):
        super().__init__(f"{location} holds no regal-backup repository",
                         "check repository.url in the policy (an unmounted volume looks empty); "
                         "`regal-backup init` creates a new one")


class FormatDowngradeError(IntegrityError):
    """The marker says an older format than the keyset has opened: it was rewritten (exit 3)."""

    def __init__(self, location: str, marker: int, remembered: int, witness: str = ""):
        witness = witness or f"this keyset has opened format {remembered}"
        super().__init__(
            f"{REPOSITORY_MARKER} of {location} says format {marker} but {witness}: someone rewrote the marker "
            "(a format downgrade, so that `regal-backup upgrade` would seal documents written without the keys)",
            f"do not run `regal-backup upgrade`; restore {REPOSITORY_MARKER} from the off-site copy (or your "
            "copy of the repository), find out who can write the repository, then `verify` every backup")


@dataclass(frozen=True)
class RepositoryInfo:
    version: int
    created_at: str
    repository_id: str


def initialize(repo: Repository, keyring: Keyring) -> RepositoryInfo:
    """Make the store hold a repository (a new one gets its sealed marker), or open the one it holds."""
    repo.check_ready()
    if repo.size(REPOSITORY_MARKER) is None:
        body = {"format": MARKER_FORMAT, "version": FORMAT_VERSION,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"), "repository_id": secrets.token_hex(8)}
        write_document(repo, keyring, REPOSITORY_KIND, REPOSITORY_MARKER, body)
    return open_repository_format(repo, keyring)


def open_repository_format(repo: Repository, keyring: Keyring) -> RepositoryInfo:
    """The repository's format, once its marker authenticates; a clear error when there is none, or when it
    predates sealed documents."""
    try:
        data = repo.get_bytes(REPOSITORY_MARKER)  # a missing bucket is its own error, not "no repository"
    except ObjectMissingError:
        raise NoRepositoryError(repo.location) from None
    if (legacy := marker_version(data)) < FORMAT_VERSION:
        refuse_downgrade(repo, keyring, legacy)
        what = "stored in clear" if legacy == 2 else "not sealed against tampering"
        raise RegalError(f"the repository {repo.location} has format {legacy}: its documents are {what}",
                         "run `regal-backup upgrade` once (it encrypts every document)")
    body = unseal(keyring, REPOSITORY_KIND, REPOSITORY_MARKER, data)
    if body.get("format") != MARKER_FORMAT or body.get("version", 0) > FORMAT_VERSION:
        raise RegalError(f"the repository {repo.location} has format {body.get('version')}; this regal-backup "
                         f"reads up to {FORMAT_VERSION}", "upgrade regal-backup")
    version = int(body["version"])
    remember_format(repo, keyring, version)
    return RepositoryInfo(version, str(body["created_at"]), str(body.get("repository_id", "")))


def refuse_downgrade(repo: Repository, keyring: Keyring, marker: int) -> None:
    """FormatDowngradeError when the keyset has opened a newer format than the marker says."""
    if keyring.repository_format is not None and keyring.repository_format > marker:
        raise FormatDowngradeError(repo.location, marker, keyring.repository_format)


def remember_format(repo: Repository, keyring: Keyring, version: int, *, locked: bool = False) -> Keyring:
    """The keyset records that it opened format `version` (once: a keyset from before the record, or a new one),
    under the keys lock (`locked`: the caller holds it). Best effort when opening: a keyset this user cannot
    write, or a lock another process holds, leaves it for the next open; the keyring as it now is."""
    if (keyring.repository_format or 0) >= version:
        return keyring
    return update_keyset(repo, keyring, lambda current: current.with_repository_format(version)
                         if (current.repository_format or 0) < version else None, locked=locked)


def update_keyset(repo: Repository, keyring: Keyring, change: Callable[[Keyring], Keyring | None], *,
                  locked: bool = False) -> Keyring:
    """Save `change(current)` over the keyset, `current` being the keyset as it is on disk under the keys lock
    (`locked`: the caller holds it); `change` returns None when the keyset on disk needs nothing. Best effort
    (unless `locked`): a keyset this user cannot write, or a lock another process holds, leaves it for the next
    time. The keyring as it now is."""
    if keyring.origin is None:
        return keyring
    with contextlib.ExitStack() as stack:
        if not locked:
            stack.enter_context(contextlib.suppress(RegalError, OSError))
            stack.enter_context(repo.lock(KEYS_LOCK))
        current = keyring.reload()  # under the lock: as a rotation or retirement meanwhile left it
        changed = change(current)
        return current if changed is None else save_keyring(changed)
    return keyring


def marker_version(data: bytes) -> int:
    """The marker's format version as written (before any authentication: to tell an old repository). An
    encrypted marker is format 3 (or newer: its authenticated body says which)."""
    if is_encrypted(data):
        return FORMAT_VERSION
    try:
        return int(json.loads(data).get("version", 0))
    except (ValueError, AttributeError, TypeError):
        return 0
