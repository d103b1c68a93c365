"""The Dagster resource every domain uses: the engine, configured from the policy file; secrets come in
through EnvVar and stay out of run config and metadata."""

from __future__ import annotations

from datetime import UTC, datetime

from dagster import ConfigurableResource, DefaultScheduleStatus, EnvVar
from pydantic import PrivateAttr

from ..engine.backup import BackupResult, archive_problem, run_backup
from ..engine.catalog import ManifestCache
from ..engine.checks import CheckRecord, run_checks
from ..engine.crypto import Keyring, load_keyring
from ..engine.manifest import Manifest
from ..engine.policy import Policy, load_policy
from ..engine.recoverability import Recoverability, target_recoverability
from ..engine.restore_test import RestoreTestResult, run_restore_test
from ..engine.retention import RetentionVerdict, retention_verdicts
from ..engine.storage import Repository, open_repository
from ..engine.verify import ReadSample

# Per policy file: the manifests this process has read and authenticated (engine/catalog.py), so that a code server
# evaluating the sensors each minute reads only new or rewritten ones. A run's process starts with an empty one.
_MANIFEST_CACHES: dict[str, ManifestCache] = {}


class RegalEngine(ConfigurableResource):
    """The backup engine for one policy file."""

    policy_path: str
    master_key: str | None = None  # filled from EnvVar when the policy keeps the master key in the environment

    _policy: Policy | None = PrivateAttr(default=None)
    _keyring: Keyring | None = PrivateAttr(default=None)

    def policy(self) -> Policy:
        if self._policy is None:
            self._policy = load_policy(self.policy_path)
        return self._policy

    def repository(self) -> Repository:
        """The policy's repository, reading manifests through this process's cache for the policy (sensors list
        every target each minute: only what changed since is read and authenticated again)."""
        repo = open_repository(self.policy())
        repo.manifest_cache = _MANIFEST_CACHES.setdefault(self.policy_path, ManifestCache())  # type: ignore[attr-defined]
        return repo

    def keyring(self) -> Keyring:
        """Loaded once per resource (one sensor evaluation, one run): a sensor asks for it per target."""
        if self._keyring is None:
            self._keyring = load_keyring(self.policy(), self.master_key)
        return self._keyring

    def backup(self, target: str, retention_class: str, trigger: dict[str, str],
               incremental: bool | None = None) -> BackupResult:
        """`incremental` None: as the target's policy says for the class (postgres_cluster `incremental: true`)."""
        return run_backup(self.policy(), target, retention_class, repo=self.repository(), keyring=self.keyring(),
                          trigger=trigger, incremental=incremental)

    def archive_problem(self, manifest: Manifest) -> str | None:
        """Wait for the target's continuous archive to reach the backup's end (engine/backup.py)."""
        return archive_problem(self.policy(), self.repository(), self.keyring(), manifest)

    def restore_test(self, manifest: Manifest, trigger: dict[str, str]) -> RestoreTestResult:
        work_dir = self.policy().restore_tests.work_dir
        return run_restore_test(self.policy(), self.repository(), self.keyring(), manifest, trigger=trigger,
                                work_dir=self.policy().resolve_path(work_dir) if work_dir else None)

    def check(self, backup_id: str, trigger: dict[str, str], sample: ReadSample | None = None) -> CheckRecord:
        return run_checks(self.policy(), self.repository(), self.keyring(), backup_id, trigger=trigger, sample=sample)

    def retention(self, target: str, backup_id: str) -> RetentionVerdict | None:
        """The backup's retention now, as `list` and `prune` tell it."""
        now = datetime.now(UTC)
        return retention_verdicts(self.policy(), self.repository(), self.keyring(), now, target).get(backup_id)

    def recoverability(self, target: str) -> Recoverability:
        """The target's recoverability model now (engine/recoverability.py), as `status` and `list` tell it."""
        return target_recoverability(self.policy(), self.repository(), self.keyring(), target, datetime.now(UTC))


def engine_resource(policy_path: str, policy: Policy) -> RegalEngine:
    env = policy.encryption.master_key.env
    if env:
        return RegalEngine(policy_path=policy_path, master_key=EnvVar(env))
    return RegalEngine(policy_path=policy_path)


def drill_schedule_status(policy: Policy) -> DefaultScheduleStatus:
    """Whether the schedules that start scratch servers on their own (the drill, the monthly restore sample)
    run when the code location loads: the policy's `dagster.drill_schedules` (running in production; the demo
    writes stopped)."""
    running = policy.dagster.drill_schedules == "running"
    return DefaultScheduleStatus.RUNNING if running else DefaultScheduleStatus.STOPPED
