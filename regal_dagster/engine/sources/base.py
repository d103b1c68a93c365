"""What a source kind is: one `Source` object per kind, found by the registry, called by the verbs.

The verbs (backup, checks, restore, restore test, drill, report) hold everything the kinds share: the
lock, the pipeline, the manifest, the checks every backup gets, the GDPR erasures, the off-site copy,
the audit trail. A kind says only what is its own:

- `capture`           read the source and store its objects through the pipeline; the facts it records
- `check_structure`   the stored objects parse as what they claim to be (an archive, an RDB, a state)
- `kind_checks`       checks only this kind has (Redis persistence, Terraform serials), with `checks`
- `restore`           put a backup back at a destination, validated against the manifest
- `scratch_destination` / `verify_restored`   where a restore test restores to, and what it proves there
- `summary`, `describe_destination`, `plaintext_needles`   facts for people, the CLI and the checks
- `restore_options`   the kind's own restore options (its dataclass), from the operator's choices
- `backup_asset_path` the Dagster asset key of a target's backups
- optional capabilities (sources/capabilities.py), None when the kind lacks them: `continuous_archive`

A new kind is a folder `engine/sources/<kind>/` whose `__init__.py` names its policy settings
(`TARGET`) and how to load its Source (`load()`); nothing else in the engine changes.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from ..errors import RegalError
from ..findings import Finding
from ..manifest import Manifest, ObjectRecord
from ..outcomes import CheckOutcome, CheckSpec
from ..settings import ErasureSubjectConfig, PolicyView, TargetSettings

if TYPE_CHECKING:
    from ..crypto import Keyring
    from ..erasure_ledger import ErasureLedger, ErasureResult
    from ..pipeline import Progress, StoredBackup
    from ..storage import Repository
    from .capabilities import ContinuousArchive

OptionsT = TypeVar("OptionsT")

StoreObject = Callable[[str, str, Iterable[bytes], int], ObjectRecord]
"""Stores one object of the backup: (name, what its content is, plaintext chunks, zstd threads: 0 in the
calling thread, -1 one per core) -> its record for the manifest."""


@dataclass
class Captured:
    objects: list[ObjectRecord]
    facts: dict[str, Any]  # the manifest's `source`: what the backup holds, as recorded at capture
    tools: dict[str, str] = field(default_factory=dict)  # tool versions used


@dataclass
class RestoreRequest:
    """What the operator asked for. `to` is kind-specific (a DSN, a directory, a file, a Redis URL)."""

    to: str
    jobs: int
    drop_existing: bool = False
    options: object | None = None  # the kind's own options (its dataclass: Source.restore_options); None: its defaults
    accept_ledger_rollback: bool = False  # go on although the GDPR ledger went back (recorded in the audit trail)
    progress: Progress | None = None
    before_writing: Callable[[], None] | None = None  # runs just before the destination is first changed
    # runs with the destination of a loaded and validated copy before anyone can see it (PostgreSQL: the
    # temporary database, before it is renamed into place): where GDPR erasures are re-applied
    before_publishing: Callable[[str], None] | None = None
    scratch: bool = False  # the destination is a restore test's throw-away one, seen by nobody: loaded in place

    def kind_options(self, kind: type[OptionsT]) -> OptionsT:
        """The kind's own options: `options`, or the kind's defaults when none were given."""
        if self.options is None:
            return kind()
        if not isinstance(self.options, kind):
            raise TypeError(f"restore options {type(self.options).__name__} given where {kind.__name__} are expected")
        return self.options


@dataclass
class Restored:
    """What a kind's restore did. `erasable` is where GDPR erasures are re-applied (None: the kind holds
    no data subjects of its own)."""

    destination: str  # for people: no credentials
    summary: str  # one line: what went where
    problems: list[str] = field(default_factory=list)  # validation against the manifest: empty when it matches
    seconds: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # kind-specific facts (JSON)
    next_steps: str = ""  # what the operator does next (load an RDB, push a state)
    erasable: str | None = None


@dataclass
class RestoredFindings:
    """What a restore test proved about a restore, beyond the restore's own validation."""

    problems: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


class Source(ABC):
    kind: ClassVar[str]
    label: ClassVar[str]  # for people: "PostgreSQL database"
    checks: ClassVar[dict[str, CheckSpec]] = {}  # the kind's own checks, beyond the ones every backup gets
    restore_test_proves: ClassVar[str]  # for people: what a passed restore test compared
    scratch_phase: ClassVar[str] = "scratch"  # a restore test's timing of setting up its scratch destination

    @abstractmethod
    def capture(self, target: TargetSettings, store: StoreObject) -> Captured: ...

    def estimate_bytes(self, target: TargetSettings) -> int | None:
        """About how many bytes a backup of `target` reads, from the source's own size estimate (for a progress
        display's percentage and ETA; never exact); None: the kind cannot tell."""
        return None

    def capture_incremental(self, policy: PolicyView, repo: Repository, keyring: Keyring, target_name: str,
                            target: TargetSettings, store: StoreObject) -> Captured:
        """An incremental backup on top of the target's newest good one (kinds that have such a thing)."""
        from ..errors import UsageError

        raise UsageError(f"{self.label} targets take no incremental backups",
                         "leave out --incremental: incremental backups are for postgres_cluster targets")

    @abstractmethod
    def check_structure(self, backup: StoredBackup) -> str:
        """One line on what parses; IntegrityError naming the object when something does not."""

    def kind_checks(self, policy: PolicyView, target: str, manifest: Manifest,
                    earlier_good: Iterator[Manifest], trigger: Mapping[str, str]) -> list[CheckOutcome]:
        """The outcomes of `checks` (earlier_good: the target's good backups before this one, newest first; trigger:
        what asked for them, as recorded, e.g. {"cli": "verify", "wal": "all"})."""
        return []

    def plaintext_needles(self, manifest: Manifest) -> list[bytes]:
        """Strings of the source that must never appear in the stored (encrypted) bytes."""
        return []

    def summary(self, manifest: Manifest) -> dict[str, Any]:
        """A few facts for lists, metadata and reports (e.g. tables and rows)."""
        return {}

    def describe_destination(self, to: str) -> str:
        """A restore destination for people and the audit trail: never a password."""
        return to

    def restore_options(self, choices: Mapping[str, Any]) -> object | None:
        """The kind's own restore options (a dataclass its `restore` reads with `request.kind_options`) from the
        operator's choices, by name (the CLI's options: `no_owners`, `keys`, ...); None: the kind has none."""
        return None

    @abstractmethod
    def restore(self, backup: StoredBackup, request: RestoreRequest) -> Restored: ...

    def backup_asset_path(self, target: str) -> list[str]:
        """The Dagster asset key of `target`'s backups."""
        return [self.kind, target, "backup"]

    def continuous_archive(self) -> ContinuousArchive | None:
        """The kind's archive of changes between backups (sources/capabilities.py), None when it has none."""
        return None

    @abstractmethod
    def scratch_destination(self, work_dir: Path | None,
                            manifest: Manifest | None = None) -> contextlib.AbstractContextManager[str]:
        """A throwaway destination for a restore test, removed (and its servers stopped) on exit; able to
        hold what the backup `manifest` needs (PostgreSQL: a server of its version with its features)."""

    def verify_restored(self, destination: str, manifest: Manifest, keyring: Keyring, jobs: int) -> RestoredFindings:
        """What a restore test checks at the destination beyond the restore's own validation."""
        return RestoredFindings()

    def preflight(self, subject: str, target: TargetSettings) -> list[Finding]:
        """`regal-backup check`: what this kind needs of its target before a backup can work (reachable,
        privileges, settings, programs on this machine), each finding with its fix."""
        return [Finding(subject, "reachable", True, f"{self.label}: nothing to check before a backup")]

    def apply_erasures(self, destination: str, ledger: ErasureLedger, target: str,
                       subjects: list[ErasureSubjectConfig]) -> ErasureResult:
        """The target's erasures in the ledger applied at a restored destination (delete or anonymize the
        subjects' rows, as `subjects` says), and what still matches counted."""
        raise RegalError(f"{self.label} targets hold no erasable data subjects",
                         "remove this target from gdpr.subjects in the policy")


def not_empty_refusal(path: Path) -> RegalError:
    return RegalError(f"{path} exists", "choose another place, or pass --drop-existing to replace it")
