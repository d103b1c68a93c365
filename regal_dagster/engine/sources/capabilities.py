"""Optional capabilities of a source kind: what the generic verbs ask a `Source` for instead of testing its kind.

A **continuous archive** (`Source.continuous_archive()`): the kind stores its changes between backups as they happen
(PostgreSQL's WAL; a MySQL binlog or a Redis AOF would be others), so a target's RPO is the age of its newest stored
change, not of its newest backup. The verbs ask it:

- `state`          how far the archive reaches now: the RPO age (`status`, the RPO alerts, the Dagster sensor: one
                   measurement, `ArchiveState.rpo_age`)
- `reach`          how far a recovery from one backup gets through it (engine/recoverability.py: the model every
                   face reads)
- `prune`          what retention removes from it: what no kept backup needs (`retention`)
- `test_recoveries`  a restore test of a backup, as recoveries through the archive (`restore_test`)
- `asset`          how Dagster shows it: an observed asset whose freshness is the RPO, and its watch sensor (`defs`)
- `first_steps`    what the on-call engineer does first when its RPO is breached (`alerts`)

A kind without such a thing returns None and the verbs treat its backups as its recovery points.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from ..crypto import Keyring
    from ..manifest import Manifest
    from ..pipeline import Progress
    from ..policy import Policy
    from ..storage import Repository

UNFED_GRACE_SECONDS = 5.0  # how long `wait_until_covered` waits while nothing feeds the archive (a stream starting)
RESTORE_FAILED = "the restore failed"  # how a restore test's findings begin when the restore itself failed


@dataclass
class TestFindings:
    """What a restore test found, before it becomes a RestoreTestResult."""

    __test__ = False  # not a pytest class
    seconds: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    erasures: dict[str, Any] = field(default_factory=dict)
    load_breakdown: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    tables: list[dict[str, Any]] | None = None  # None: the manifest's tables


@dataclass
class ArchiveState:
    """How far a target's continuous archive reaches now: the RPO as a measured number."""

    newest_position: str | None  # the newest stored position, as the kind writes it (a WAL position); None: nothing
    newest_stored_at: datetime | None  # when the newest stored change was stored
    behind: int | None  # how much the source has written that is not stored yet (0: caught up; None: not asked)
    gaps: list[str] = field(default_factory=list)  # what the archive lacks (a restore cannot pass it)
    details: dict[str, Any] = field(default_factory=dict)  # the kind's own facts, for alerts (JSON)
    metadata: dict[str, str | int | float] = field(default_factory=dict)  # the kind's own facts, for Dagster
    newest_number: int | None = None  # the newest stored position as a number (a WAL position's byte offset)
    newest_commit_at: datetime | None = None  # the newest commit the last proof of the archive found in it
    fed: bool | None = None  # something stores the source's changes now (a stream connected); None: not asked
    lost: list[str] = field(default_factory=list)  # changes stored but lost at a failover ("RANGE: why"), by range

    def rpo_age(self, now: datetime) -> float | None:
        """The age of the newest data a restore reaches: 0 when the archive has caught up with the source, else that
        of the newest stored change (also while the source cannot be asked); None when nothing is stored or the
        archive has a gap."""
        newest = self.newest_data_at(now)
        return None if newest is None or self.gaps else (now - newest).total_seconds()

    def newest_data_at(self, now: datetime) -> datetime | None:
        """When the newest data the archive stores was current: now when it has caught up with the source, else when
        its newest change was stored (also while the source cannot be asked); None when nothing is stored."""
        if self.newest_stored_at is None:
            return None
        return now if self.behind == 0 else self.newest_stored_at


@dataclass(frozen=True)
class ArchiveReach:
    """How far a recovery from one backup gets through the archive."""

    recoverable: bool  # it restores at all (the archive holds what it needs to reach its own end)
    position: str | None  # the newest position it reaches (None: not recoverable)
    note: str  # for people: how far, and what stops it (naming what is missing or unreadable)
    position_number: int | None = None  # the same as a number that orders positions (a WAL position's byte offset)


@dataclass(frozen=True)
class ArchiveAsset:
    """How Dagster shows a target's continuous archive: an asset Dagster observes but never materializes (the
    archive is fed by a service, not a run), whose freshness is the target's RPO, reported by a watch sensor (one
    sensor per kind of archive, for all its targets)."""

    key: tuple[str, ...]
    group: str
    kinds: frozenset[str]
    description: str  # for people; "{rpo}" stands for the target's RPO
    sensor: str  # the watch sensor's name
    sensor_description: str


class ContinuousArchive(ABC):
    noun: ClassVar[str]  # for people: what the archive holds ("WAL")

    @abstractmethod
    def state(self, policy: Policy, repo: Repository, keyring: Keyring, target: str, now: datetime) -> ArchiveState:
        """What the archive holds now, against the source (asked when it can be reached)."""

    def covers(self, policy: Policy, repo: Repository, keyring: Keyring, manifest: Manifest) -> bool:
        """Whether the archive holds what a recovery from the backup `manifest` needs to reach its consistent end
        (WAL from its start to its stop position): until then the backup restores nothing. An archive that
        cannot tell says True (nothing waits for it; its own checks judge the backup)."""
        return True

    def wait_until_covered(self, policy: Policy, repo: Repository, keyring: Keyring, manifest: Manifest,
                           timeout: float) -> bool:
        """`covers`, asked again until it is true or `timeout` seconds have passed (the archive is fed by a service
        that stores what the server writes every few seconds, as pgBackRest's archive-timeout waits for it)."""
        import time

        deadline = time.monotonic() + timeout
        self.hurry(policy, manifest)
        unfed_since: float | None = None
        while not self.covers(policy, repo, keyring, manifest):
            now = time.monotonic()
            if self.fed(policy, manifest.target) is False:  # nothing feeds it: do not wait for what will not come
                unfed_since = now if unfed_since is None else unfed_since
            else:
                unfed_since = None
            if now >= deadline or (unfed_since is not None and now - unfed_since >= UNFED_GRACE_SECONDS):
                return False
            time.sleep(0.5)
        return True

    def fed(self, policy: Policy, target: str) -> bool | None:
        """Whether something feeds the archive now (a stream connected, the source archiving); None: unknown."""
        return None

    @abstractmethod
    def reach(self, manifest: Manifest, state: ArchiveState, broken: str | None) -> ArchiveReach:
        """How far a recovery from the backup `manifest` gets through the archive as `state` says it is, when
        `broken` (what the newest check of the archive found missing or unreadable, None: it passed) stops it."""

    def hurry(self, policy: Policy, manifest: Manifest) -> None:
        """Ask the source to hand over what the backup `manifest` needs now rather than later (best effort)."""

    @abstractmethod
    def first_steps(self, target: str, state: ArchiveState) -> str:
        """What to do first when the archive is behind its RPO, lacks something, or holds nothing."""

    @abstractmethod
    def prune(self, policy: Policy, repo: Repository, keyring: Keyring, target: str, kept: set[str], *,
              dry_run: bool) -> int | None:
        """Remove (dry run: count) what no kept backup (`kept`: their ids) can use; how many files. None: no backup
        is kept, and nothing is removed."""

    @abstractmethod
    def test_recoveries(self, policy: Policy, repo: Repository, keyring: Keyring, manifest: Manifest, *,
                        tested_at: datetime, work_dir: Path | None, jobs: int, progress: Progress | None,
                        touch_source: bool) -> TestFindings:
        """The restore test of `manifest`: recoveries from it through the archive, each validated and timed."""

    @abstractmethod
    def asset(self, target: str) -> ArchiveAsset:
        """How Dagster shows the archive of `target`."""
