"""The repository's own marker, `regal-repository.json`: that a repository is here, and its format.

Format 2 (this version): every document in the repository is sealed (engine/documents.py), and so is the
marker. Format 1 repositories (self-checksummed manifests, plain JSON documents, a plain marker) are read
after `regal-backup upgrade` (engine/upgrade.py) has sealed them; until then every command says so.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from .crypto import Keyring
from .documents import unseal, write_document
from .errors import RegalError, UsageError
from .layout import REPOSITORY_MARKER
from .storage import Repository
from .storage.base import ObjectMissingError

REPOSITORY_KIND = "repository"
MARKER_FORMAT = "regal-backup-repository"
FORMAT_VERSION = 2


class NoRepositoryError(UsageError):
    """No repository where the policy points: a wrong path, an unmounted volume, a new bucket."""

    def __init__(self, location: str):
        super().__init__(f"{location} holds no regal-backup repository",
                         "check repository.url in the policy (an unmounted volume looks empty); "
                         "`regal-backup init` creates a new one")


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
        raise RegalError(f"the repository {repo.location} has format {legacy}: its documents are not sealed "
                         "against tampering", "run `regal-backup upgrade` once (it seals every document)")
    body = unseal(keyring, REPOSITORY_KIND, REPOSITORY_MARKER, data)
    if body.get("format") != MARKER_FORMAT or body.get("version", 0) > FORMAT_VERSION:
        raise RegalError(f"the repository {repo.location} has format {body.get('version')}; this regal-backup "
                         f"reads up to {FORMAT_VERSION}", "upgrade regal-backup")
    return RepositoryInfo(int(body["version"]), str(body["created_at"]), str(body.get("repository_id", "")))


def marker_version(data: bytes) -> int:
    """The marker's format version as written (before any authentication: to tell an old repository)."""
    try:
        return int(json.loads(data).get("version", 0))
    except (ValueError, AttributeError, TypeError):
        return 0
