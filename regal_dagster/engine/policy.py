"""The policy file: one YAML document that says what is backed up, where, how often and for how long.

Loaded with `load_policy(path)`; every problem is reported by its path (`targets.pos.dsn: missing`).
Defaults follow the runbook (docs/policy.md describes every setting).
"""

from __future__ import annotations

import hashlib
import os
import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import yaml
from pydantic import Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from .channels.base import ChannelSettings
from .channels.registry import channel_kinds, channel_models
from .errors import PolicyError, UsageError
from .fleet import FleetConfig
from .monitoring_config import MonitoringConfig
from .policy_location import POLICY_ENV, policy_file
from .retention_classes import RETENTION_CLASSES, RetentionClass
from .settings import (  # the fragments below the plug-ins that the policy assembles
    RUNBOOK_OWNERS,
    RUNBOOK_REPORT_OWNERS,
    CompressionConfig,
    Cron,
    CronExpression,
    Duration,
    EncryptionConfig,
    ErasureSubjectConfig,
    Owner,
    RepositorySettings,
    ScheduleConfig,
    Settings,
    TargetSettings,
    default_jobs,
    fill_environment,
    is_first_match_in_month,
    resolve_policy_path,
)
from .sources.discovery import kinds, target_models
from .storage.registry import backend_for, backends
from .transport import Transport, url_transport


class _UnservedRepository(RepositorySettings):
    """A repository whose URL no backend serves: validated only to say so (`url`), or that the URL is missing."""

    @field_validator("url")
    @classmethod
    def _served(cls, url: str) -> str:
        backend_for(url)  # ValueError listing the URLs this regal-backup can open
        return url


_UNSERVED = "unserved"


def _repository_backend(value: Any) -> str:
    """The tag of the backend serving a repository's URL (a backend's `kind`), for the union below."""
    url = value.url if isinstance(value, RepositorySettings) else value.get("url") if isinstance(value, dict) else None
    try:
        return backend_for(url).kind if isinstance(url, str) else _UNSERVED
    except ValueError:
        return _UNSERVED


if TYPE_CHECKING:
    TargetConfig = TargetSettings
    AlertChannel = ChannelSettings
    RepositoryConfig = RepositorySettings
else:  # every source kind's settings, told apart by `kind` (engine/sources/<kind>/target.py)
    TargetConfig = Annotated[Union[tuple(target_models())], Field(discriminator="kind")]  # noqa: UP007
    # every alert channel's settings, told apart by `kind` (engine/channels/<kind>.py)
    AlertChannel = Annotated[Union[tuple(channel_models())], Field(discriminator="kind")]  # noqa: UP007
    # every backend's repository settings, chosen by the URL's scheme (engine/storage/<backend>.py)
    RepositoryConfig = Annotated[
        Union[tuple(Annotated[b.config, Tag(b.kind)] for b in backends())  # noqa: UP007
              + (Annotated[_UnservedRepository, Tag(_UNSERVED)],)],
        Discriminator(_repository_backend)]
_REPOSITORY_TAGS = {b.kind for b in backends()} | {_UNSERVED}



def _default_schedules() -> dict[RetentionClass, ScheduleConfig]:
    return {
        "hourly": ScheduleConfig(cron="0 * * * *"),
        "daily": ScheduleConfig(cron="0 2 * * *"),
        "weekly": ScheduleConfig(cron="0 1 * * 0"),
        "monthly": ScheduleConfig(cron="0 1 * * 0", first_in_month=True),
    }


class RetentionConfig(Settings):
    """How many periods of each class are kept (grandfather-father-son)."""

    hourly: int = Field(48, ge=0, description="hours")
    daily: int = Field(30, ge=0, description="days")
    weekly: int = Field(26, ge=0, description="weeks (26 = 6 months)")
    monthly: int = Field(12, ge=0, description="months (84 = seven years)")

    def retain_until(self, retention_class: str, started_at: datetime) -> datetime:
        count = getattr(self, retention_class)
        if retention_class == "monthly":
            month = started_at.month - 1 + count
            year = started_at.year + month // 12
            return started_at.replace(year=year, month=month % 12 + 1, day=min(started_at.day, 28))
        period = {"hourly": timedelta(hours=1), "daily": timedelta(days=1), "weekly": timedelta(weeks=1)}
        return started_at + period[retention_class] * count


class PruneConfig(Settings):
    cron: Cron = Field("30 2 * * *", description="when the prune job runs (UTC)")
    retention_check_cron: Cron = Field("0 6 1 1,4,7,10 *", description="the quarterly proof that nothing is "
                                       "kept past its retention (UTC; PCI DSS 3.2.1)")
    failed_grace: Duration = Field(timedelta(days=7), description="backups that failed their checks are kept "
                                   "this long for investigation")
    unchecked_grace: Duration = Field(timedelta(days=1), description="a backup not checked yet is kept this long")
    orphan_grace: Duration = Field(timedelta(days=1), description="objects of unfinished backups (no manifest) are "
                                   "removed once this old")


class ChecksConfig(Settings):
    verify_cron: Cron = Field("30 3 * * *", description="the daily verification (UTC), after the 02:00 backup: every "
                              "target's newest backup read again (storage bit rot is found within a day) and "
                              "every unchecked one checked")
    size_tolerance: float = Field(0.5, gt=0, description="WARN when a backup's size differs from the median "
                                  "of the recent good backups by more than this fraction")
    size_history: int = Field(10, ge=3, le=100, description="how many recent good backups the size check uses")
    sample_kb: int = Field(64, ge=4, le=65536, description="KB read from each end of every object when "
                           "looking for plaintext")
    daily_sample_percent: float | None = Field(None, gt=0, le=100, description="the daily verification reads "
                                               "only this random share (%) of the newest backup's objects in full "
                                               "when it is good already, as `verify --sample` (seed recorded); "
                                               "default: every byte")


class CapacityConfig(Settings):
    min_free_fraction: float = Field(0.15, ge=0, le=1, description="local repository: alert below this free disk")
    s3_quota_bytes: int | None = Field(None, ge=1, description="S3: the bucket budget usage is measured against")
    max_used_fraction: float = Field(0.8, gt=0, le=1, description="S3: alert above this share of the quota")
    min_days_until_full: float | None = Field(14, ge=0, description="alert when the repository is forecast to be "
                                              "full sooner than this, at its growth of the forecast window (null: "
                                              "no forecast alert)")
    forecast_window: Duration = Field(timedelta(days=30), description="the growth the forecast extrapolates: the "
                                      "bytes stored by the backups of this last period")


class AlertsConfig(Settings):
    channels: list[AlertChannel] = Field(default_factory=list)
    remind_after: Duration = Field(timedelta(hours=4), description="repeat an alert that has not cleared")
    capacity: CapacityConfig = CapacityConfig()


class RestoreTestsConfig(Settings):
    classes: list[RetentionClass] = Field(default_factory=lambda: list(RETENTION_CLASSES[1:]),
                                          description="new good backups of these classes are restore-tested once")
    monthly_cron: Cron = Field("0 4 1 * *", description="the monthly random sample (UTC)")
    monthly_sample: int = Field(2, ge=1, le=50, description="backups drawn at random, across targets and ages")
    drill_cron: Cron = Field("0 5 1 1,4,7,10 *", description="the quarterly disaster-recovery drill (UTC)")
    work_dir: str | None = Field(None, description="where scratch servers live (default: the temp directory)")


class GdprConfig(Settings):
    subjects: dict[str, list[ErasureSubjectConfig]] = Field(
        default_factory=dict, description="target -> the tables holding its data subjects")


class AuditConfig(Settings):
    """Where the audit trail lives: a PostgreSQL database (the schema regal_audit is created there)."""

    dsn: str = Field(description="libpq URI of the audit database; ${VAR} is read from the environment")
    retention_months: int = Field(12, ge=12, description="entries are kept at least this long (PCI DSS 10.5.1: "
                                  "12 months); the trail refuses deletion, so this is the promise reports check")

    def resolved_dsn(self) -> str:
        return fill_environment(self.dsn, "audit.dsn")


class SigningConfig(Settings):
    """A certificate the compliance reports are signed with (PAdES, by pyHanko)."""

    cert_file: str = Field(description="PEM certificate (relative to the policy file)")
    key_file: str = Field(description="PEM private key (mode 0600)")
    passphrase_env: str | None = Field(None, description="environment variable holding the key's passphrase")
    chain_files: list[str] = Field(default_factory=list, description="PEM intermediate certificates")


def _default_exception_owners() -> dict[str, str]:
    operations, security = "Backup operations lead", "Information security officer"
    privacy = "Data protection officer"
    return {"BK": operations, "VR": operations, "RT": operations, "MD": operations, "AL": operations,
            "DR": "Disaster-recovery coordinator", "EN": security, "KM": security, "AU": security,
            "RD": privacy, "GD": privacy}


class ReportsConfig(Settings):
    cron: Cron = Field("0 7 1 * *", description="the monthly report (UTC), on the month before")
    signing: SigningConfig | None = None
    exception_owners: dict[str, str] = Field(
        default_factory=_default_exception_owners,
        description="who remediates a control's exception: a role per control family (BK, VR, RT, DR, EN, "
                    "KM, RD, MD, AU, AL, GD) or per control (BK-01); a control's own entry wins; given "
                    "entries replace the defaults of the same key only")
    remediation_days: int = Field(30, ge=1, le=365, description="an exception is due this many days after "
                                  "the end of the period it was found in")
    signoff_within: Duration = Field(timedelta(days=14), description="a passed restore test or drill must be "
                                     "signed off by management (`regal-backup signoff`) within this long (SO-01)")
    frameworks: list[str] = Field(default_factory=lambda: ["pci", "sox", "gdpr"], min_length=1,
                                  description="the compliance frameworks in scope, by id: pci, sox, gdpr, soc2, "
                                  "iso27001, hipaa, dora, nis2, nist80053 (`regal-backup report --framework` "
                                  "overrides)")
    owners: list[Owner] = Field(default_factory=lambda: list(RUNBOOK_REPORT_OWNERS), min_length=1,
                                description="who owns the compliance report asset in Dagster (default: the "
                                            "runbook's Security and Operations Teams)")

    @field_validator("exception_owners")
    @classmethod
    def _owner_keys(cls, owners: dict[str, str]) -> dict[str, str]:
        for key, role in owners.items():
            if not re.fullmatch(r"[A-Z]{2}(-\d{2})?", key):
                raise ValueError(f"'{key}': name a control family (BK) or a control (BK-01)")
            if not role.strip():
                raise ValueError(f"'{key}': give the owner's role")
        return {**_default_exception_owners(), **owners}

    def owner_of(self, control_id: str) -> str:
        owners = self.exception_owners
        return owners.get(control_id) or owners.get(control_id[:2], "Backup service owner")


class TierConfig(Settings):
    """A criticality tier (from the business impact analysis): what every target of it must get."""

    backup_every: Duration = Field(description="the minimum backup frequency: no two successful backups further "
                                   "apart than this")
    rpo: Duration = Field(description="the recovery point objective it implies (a target's own `rpo` wins)")
    rto: Duration = Field(description="the recovery time objective it implies (a target's own `rto` wins)")
    schedules: dict[RetentionClass, ScheduleConfig] = Field(
        default_factory=dict, description="crons of this tier's targets, over the policy's `schedules` (a class "
                                          "left out keeps it): a Dagster schedule of its own")
    description: str | None = None


class RestoreApprovalConfig(Settings):
    """Restores into production need an approval recorded first (`regal-backup approve`), by someone other
    than the person restoring."""

    targets: list[str] = Field(description="the production targets: a restore into one of them (its own "
                               "location) needs an approval")
    valid_for: Duration = Field(timedelta(hours=24), description="an approval is used once, within this long")


class DagsterConfig(Settings):
    base_url: str = "http://localhost:3000"
    drill_schedules: Literal["running", "stopped"] = Field(
        "running", description="the schedules that start scratch servers on their own (quarterly_dr_drill, "
                               "monthly_restore_sample): running in production; the demo writes `stopped` so that "
                               "its instance starts nothing noisy (turn them on in the UI)")


class Policy(Settings):
    version: Literal[1] = 1
    repository: RepositoryConfig
    offsite: RepositoryConfig | None = Field(None, description="a second repository (another bucket and "
                                             "region, or another path) every backup is copied to and verified in")
    encryption: EncryptionConfig
    targets: dict[str, TargetConfig]
    rpo: Duration = timedelta(hours=1)
    rto: Duration = timedelta(hours=4)
    jobs: int = Field(default_factory=default_jobs, ge=1, le=32,
                      description="parallel workers for backups, checks, restores and restore tests (default: "
                                  "the CPU count, at most 8); a target's own `jobs` wins")
    tiers: dict[str, TierConfig] = Field(default_factory=dict, description="criticality tiers by name (e.g. "
                                         "tier1): targets name theirs with `tier`")
    owners: list[Owner] = Field(default_factory=lambda: list(RUNBOOK_OWNERS), min_length=1,
                                description="who owns each target's assets in Dagster (e-mail or team:NAME), unless "
                                            "the target names its own (default: the runbook's Operations and "
                                            "Database Teams)")
    schedules: dict[RetentionClass, ScheduleConfig] = Field(default_factory=_default_schedules)
    retention: RetentionConfig = RetentionConfig()
    prune: PruneConfig = PruneConfig()
    compression: CompressionConfig = CompressionConfig()
    checks: ChecksConfig = ChecksConfig()
    restore_tests: RestoreTestsConfig = RestoreTestsConfig()
    gdpr: GdprConfig = GdprConfig()
    alerts: AlertsConfig = AlertsConfig()
    dagster: DagsterConfig = DagsterConfig()
    monitoring: MonitoringConfig = MonitoringConfig()
    audit: AuditConfig | None = None
    restore_approval: RestoreApprovalConfig | None = None
    reports: ReportsConfig = ReportsConfig()
    fleet: FleetConfig = FleetConfig()
    # Directory of the policy file: relative paths (keyset, local repository) resolve against it.
    base_dir: Path = Field(default=Path("."), exclude=True)
    # SHA-256 of the policy file as loaded (the audit trail records every change of it).
    source_sha256: str = Field(default="", exclude=True)

    @field_validator("repository", "offsite")
    @classmethod
    def _lock_needs_a_locking_store(cls, config: RepositoryConfig | None) -> RepositoryConfig | None:
        if config is not None and config.object_lock is not None and not backend_for(config.url).locks_objects:
            lockers = " or ".join(f"{s}://" for b in backends() if b.locks_objects for s in b.schemes)
            raise ValueError(f"object_lock needs an {lockers} repository "
                             f"(a {backend_for(config.url).kind} cannot lock objects)")
        return config

    @field_validator("targets")
    @classmethod
    def _target_names(cls, targets: dict[str, TargetConfig]) -> dict[str, TargetConfig]:
        if not targets:
            raise ValueError("at least one target is needed")
        for name in targets:
            if not re.fullmatch(r"[a-z][a-z0-9_]{0,62}", name):
                raise ValueError(f"target name '{name}': use lower-case letters, digits and _")
        underivable = sorted(name for name, config in targets.items() if not config.host and not config.endpoint())
        if underivable:
            raise ValueError(f"the server of target(s) {', '.join(underivable)} cannot be derived from the DSN or URL "
                             "(its host is a ${VARIABLE}): give each a `host:` (the server's name, for the "
                             "per-host run limit)")
        return targets

    @field_validator("tiers")
    @classmethod
    def _tier_names(cls, tiers: dict[str, TierConfig]) -> dict[str, TierConfig]:
        for name in tiers:  # a tier with crons names a Dagster schedule (`hourly_backups__tier_<name>`)
            if not re.fullmatch(r"[a-z][a-z0-9_]{0,62}", name):
                raise ValueError(f"tier name '{name}': use lower-case letters, digits and _")
        return tiers

    @model_validator(mode="after")
    def _known_tiers_and_approval_targets(self) -> Policy:
        if self.restore_approval is not None:
            for name in self.restore_approval.targets:
                if name not in self.targets:
                    raise ValueError(f"restore_approval.targets: '{name}' is not one of the policy's targets")
            if self.audit is None:
                raise ValueError("restore_approval needs an audit trail (audit.dsn): approvals are audit events")
        for name, target in self.targets.items():
            if target.tier is not None and target.tier not in self.tiers:
                raise ValueError(f"targets.{name}.tier: '{target.tier}' is not one of the policy's tiers "
                                 f"({', '.join(sorted(self.tiers)) or 'none defined: add `tiers:`'})")
        return self

    def host_of(self, name: str) -> str:
        """The server a target lives on (`regal/host`): its `host:`, else derived from its DSN or URL."""
        config = self.target(name)
        return config.host or config.endpoint() or "local"

    def zone_of(self, name: str) -> str:
        return self.target(name).zone or self.fleet.default_zone

    def schedules_for(self, name: str) -> dict[RetentionClass, tuple[str, ScheduleConfig]]:
        """The target's crons per class, each with where it comes from: `policy`, `tier:<name>`, `target`."""
        config = self.target(name)
        found: dict[RetentionClass, tuple[str, ScheduleConfig]] = {
            cls: ("policy", schedule) for cls, schedule in self.schedules.items()}
        if config.tier:
            tier = self.tiers[config.tier]
            found.update({cls: (f"tier:{config.tier}", s) for cls, s in tier.schedules.items()})
        found.update({cls: ("target", s) for cls, s in config.schedules.items()})
        return found

    def tier_of(self, name: str) -> TierConfig | None:
        tier = self.target(name).tier
        return self.tiers[tier] if tier else None

    def target(self, name: str) -> TargetConfig:
        if name not in self.targets:
            known = ", ".join(sorted(self.targets)) or "none"
            raise UsageError(f"the policy has no target named '{name}' (its targets: {known})",
                             "name one of the policy's targets (`regal-backup status` lists them)")
        return self.targets[name]

    def rpo_for(self, name: str) -> timedelta:
        """The target's own RPO, else its tier's, else the policy's."""
        tier = self.tier_of(name)
        return self.target(name).rpo or (tier.rpo if tier else self.rpo)

    def rto_for(self, name: str) -> timedelta:
        tier = self.tier_of(name)
        return self.target(name).rto or (tier.rto if tier else self.rto)

    def owners_for(self, name: str) -> list[str]:
        """The owners Dagster shows on the target's assets: its own, else the policy's."""
        return list(self.target(name).owners or self.owners)

    def transports(self) -> list[Transport]:
        """Every connection that carries backup data or keys, and whether the policy makes it encrypted."""
        found = [backend_for(self.repository.url).transport(self.repository, "repository")]
        if self.offsite is not None:
            found.append(backend_for(self.offsite.url).transport(self.offsite, "off-site repository"))
        for name, target in sorted(self.targets.items()):
            found += target.transports(name)
        if self.audit is not None:
            from .postgresql.connection import dsn_transport

            try:
                dsn = self.audit.resolved_dsn()
            except PolicyError:
                dsn = self.audit.dsn
            found.append(dsn_transport("audit trail database", dsn))
        if self.encryption.master_key.kms_key_uri:
            endpoint = self.encryption.master_key.kms_endpoint_url
            found.append(url_transport("master key: AWS KMS", endpoint, ("https",)))
        return found

    def jobs_for(self, name: str) -> int:
        return self.target(name).jobs or self.jobs

    def resolve_path(self, path: str) -> Path:
        """A path the policy names, as settings.resolve_policy_path reads it (relative: from the policy's folder)."""
        return resolve_policy_path(self.base_dir, path)

    def local_repository_path(self, config: RepositorySettings | None = None) -> Path:
        url = (config or self.repository).url
        return self.resolve_path(url.removeprefix("file://"))

    def secret_names(self) -> set[str]:
        """Every environment variable the policy reads a secret from."""
        names = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", self.model_dump_json()))
        if self.encryption.master_key.env:
            names.add(self.encryption.master_key.env)
        for channel in self.alerts.channels:
            names.update(v for k, v in channel.model_dump().items() if k.endswith("_env") and isinstance(v, str))
        if self.reports.signing and self.reports.signing.passphrase_env:
            names.add(self.reports.signing.passphrase_env)
        if self.monitoring.watchdog.heartbeat_url_env:
            names.add(self.monitoring.watchdog.heartbeat_url_env)
        return names

    def retention_class_for_tick(self, tick: datetime, target: str | None = None) -> RetentionClass | None:
        """The class a backup started at `tick` belongs to: the highest class scheduled then (for `target`: by its
        own schedules, its tier's and the policy's)."""
        schedules = {cls: s for cls, (_, s) in self.schedules_for(target).items()} if target else self.schedules
        chosen: RetentionClass | None = None
        for cls in RETENTION_CLASSES:
            schedule = schedules.get(cls)
            if schedule and CronExpression.parse(schedule.cron).matches(tick) and (
                not schedule.first_in_month or is_first_match_in_month(schedule.cron, tick)
            ):
                chosen = cls
        return chosen


_UNION_TAGS = {*kinds(), *channel_kinds()}  # pydantic puts a union's tag in the path


def hook_environment(policy: Policy) -> dict[str, str]:
    """The environment of an operator's hook command: theirs, without the policy's secrets."""
    secrets = policy.secret_names()
    return {k: v for k, v in os.environ.items() if k not in secrets}


def _misplaced_repository_setting(section: str, tag: str, setting: str) -> str | None:
    """A setting that belongs to another backend's repositories (an S3 setting on a `file` one): what to remove."""
    owners = [b for b in backends() if b.kind != tag and setting in b.config.model_fields]
    if tag == _UNSERVED or not owners:
        return None
    this = next(b for b in backends() if b.kind == tag)
    wanted = " or ".join(f"{s}://" for b in owners for s in b.schemes)
    return (f"{section}: {setting} needs an {wanted} repository; this one is a {this.kind} repository "
            f"({this.example}), which has no such setting: remove {setting}")


def _format_problem(error: dict[str, Any]) -> str:
    loc = [str(p) for p in error["loc"]]
    if len(loc) >= 2 and loc[0] in ("repository", "offsite") and loc[1] in _REPOSITORY_TAGS:
        if error["type"] == "model_type":
            return f"{loc[0]}: expected a mapping of settings (url: and the settings its backend takes)"
        if error["type"] == "extra_forbidden" and len(loc) == 3:
            misplaced = _misplaced_repository_setting(loc[0], loc[1], loc[2])
            if misplaced:
                return misplaced
        del loc[1]
    if len(loc) >= 3 and loc[0] in ("targets", "channels", "alerts") and loc[2] in _UNION_TAGS:
        del loc[2]
    elif len(loc) >= 4 and loc[:2] == ["alerts", "channels"] and loc[3] in _UNION_TAGS:
        del loc[3]
    path = ".".join(loc) or "(top)"
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        expected = error.get("ctx", {}).get("expected_tags", "")
        return f"{path}.kind: use one of {expected}"
    if error["type"] == "missing":
        return f"{path}: missing"
    if error["type"] == "extra_forbidden":
        return f"{path}: unknown setting"
    message = error["msg"].removeprefix("Value error, ")
    return f"{path}: {message}"


def load_policy(path: str | os.PathLike[str] | None = None) -> Policy:
    """Load and validate the policy at `path` (or $REGAL_POLICY, or ./regal_backup.yaml)."""
    chosen = policy_file(path)
    if not chosen.is_file():
        raise PolicyError(str(chosen), [
            f"file not found (set --policy or {POLICY_ENV}, or create one with `regal-backup init DIR`)"
        ])
    raw = chosen.read_bytes()
    try:
        document = yaml.safe_load(raw.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise PolicyError(str(chosen), [f"not valid YAML: {exc}"]) from None
    if not isinstance(document, dict):
        raise PolicyError(str(chosen), ["(top): expected a mapping of settings"])
    policy = policy_from_dict(document, base_dir=chosen.resolve().parent, source=str(chosen))
    return policy.model_copy(update={"source_sha256": hashlib.sha256(raw).hexdigest()})


def policy_from_dict(document: dict[str, Any], base_dir: Path, source: str = "(policy)") -> Policy:
    try:
        return Policy.model_validate({**document, "base_dir": base_dir})
    except ValidationError as exc:
        raise PolicyError(source, [_format_problem(dict(e)) for e in exc.errors()]) from None


