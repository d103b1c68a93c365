"""The building blocks of the policy file, BELOW the plug-ins: durations, cron expressions, ${VAR}
references, where relative paths lead, the settings every target has and every repository has, and the
config fragments that storage, crypto, the pipeline and the source kinds read (retry, compression,
encryption, erasure subjects). Each source kind defines its own target settings on `TargetSettings` in
engine/sources/<kind>/target.py, each storage backend its own repository settings on `RepositorySettings`
in its module; engine/policy.py (above the registries) puts them together. Nothing here imports a
plug-in or the policy: what a module below the policy reads of the assembled policy is `PolicyView`."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from .errors import PolicyError, UsageError
from .retention_classes import RetentionClass
from .transport import Transport


class Settings(BaseModel):
    """A section of the policy file: unknown settings are errors, values never change once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: Any) -> timedelta:
    """'90s', '30m', '1h', '2d', '1w' (or a number of seconds) -> timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return timedelta(seconds=value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"'{value}' is not a duration; write e.g. 30m, 1h, 2d or 1w")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


def _valid_cron(cron: str) -> str:
    CronExpression.parse(cron)  # ValueError says what is wrong
    return cron


Cron = Annotated[str, AfterValidator(_valid_cron)]  # five fields, UTC


def _valid_owner(owner: str) -> str:
    if not (re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", owner) or re.fullmatch(r"team:[\w.-]+", owner)):
        raise ValueError(f"'{owner}' is neither an e-mail address nor team:NAME (Dagster shows asset owners as "
                         "one of those)")
    return owner


Owner = Annotated[str, AfterValidator(_valid_owner)]  # who owns an asset in Dagster: an e-mail or team:NAME
RUNBOOK_OWNERS = ["ops@company.com", "dba@company.com"]  # the runbook's Appendix A: Operations and Database Teams
RUNBOOK_REPORT_OWNERS = ["security@company.com", "ops@company.com"]  # ... the Security Team for the reports


def default_jobs() -> int:
    """Parallel connections when none are configured: one per CPU core, at most 8."""
    return min(os.cpu_count() or 2, 8)


def fill_environment(text: str, setting: str) -> str:
    """`text` with ${VAR} references filled from the environment (the result is never logged)."""
    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise PolicyError("(environment)", [f"{setting} references ${{{name}}} but it is not set"])
        return os.environ[name]

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", fill, text)


def fill_option(text: str, option: str) -> str:
    """A command-line value (`--to`) with its ${VAR} references filled from the environment, as the policy's
    are: a password need never be written on a command line, where every local user can read it
    (/proc/PID/cmdline). A missing variable is a usage error naming it."""
    try:
        return fill_environment(text, option)
    except PolicyError as exc:
        raise UsageError(exc.problems[0], f"export the variable, or write the value in {option}") from None


def resolve_policy_path(base_dir: Path, path: str) -> Path:
    """A path written in the policy: `~` expanded; a relative one from the policy file's directory (`base_dir`).
    The one rule for every path the policy names (keyset, master key file, local repository, channels'
    files, signing certificates, work directories)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base_dir / p).resolve()


DataClass = Literal["payment data", "personal data", "operational data", "configuration"]


class ScheduleConfig(Settings):
    cron: Cron
    first_in_month: bool = Field(False, description="run only on the first matching day of each month")


class TargetSettings(Settings):
    """What every target has; a kind adds its own settings and `kind: Literal[\"<kind>\"]`."""

    kind: str
    rpo: Duration | None = None
    rto: Duration | None = None
    description: str | None = Field(None, description="what this is, for people and the compliance report")
    data_classes: list[DataClass] = Field(default_factory=list, description="what it holds, for the report's scope")
    jobs: int | None = Field(None, ge=1, le=32, description="parallel workers for this target's backups, checks, "
                             "restores and restore tests (default: the policy's `jobs`)")
    host: str | None = Field(None, min_length=1, description="the server this target lives on, for the per-host "
                             "run limit (`regal/host`; default: derived from the DSN or URL)")
    zone: str | None = Field(None, min_length=1, description="the network zone whose workers back it up "
                             "(`regal/zone`; default: the policy's `fleet.default_zone`)")
    tier: str | None = Field(None, min_length=1, description="its criticality tier (a key of the policy's `tiers`): "
                             "the backup frequency, RPO and RTO it implies, and the tier's crons it follows")
    schedules: dict[RetentionClass, ScheduleConfig] = Field(
        default_factory=dict, description="crons of this target alone, over its tier's and the policy's")

    def endpoint(self) -> str | None:
        """The server or endpoint a backup of this target reads from (`regal/host`), when its settings say it;
        None when they cannot (a host given by a ${VARIABLE}). A kind reading this machine's files: `local`."""
        return "local"
    owners: list[Owner] | None = Field(None, description="who owns this target's assets in Dagster: e-mail "
                                       "addresses or team:NAME (default: the policy's `owners`)")

    def transports(self, name: str) -> list[Transport]:
        """The network connections a backup of this target makes, and whether each is encrypted (a kind
        that reads local files makes none)."""
        return []

    def own_location(self) -> str | None:
        """Where the target itself lives, as a restore destination (a DSN): a restore there writes over
        production. None: the kind cannot tell (then every restore of it counts as one into production)."""
        return None

    def restores_onto_itself(self, destination: str, describe: Callable[[str], str]) -> bool:
        """A restore to `destination` writes where the target itself lives (its own database, server or
        location): a restore into production. `describe`: the kind's way of naming a destination."""
        own = self.own_location()
        return own is None or describe(own) == describe(destination)

    def written_password(self) -> str:
        """A password written into the policy itself for this target (its DSN's, its URL's), as written: "" when
        there is none (a ${VARIABLE} is one, as written)."""
        return ""


class RetryConfig(Settings):
    """How a storage request that failed for a passing reason (connection refused, dropped or timed out;
    HTTP 5xx, SlowDown, throttling) is made again. Other errors are never retried."""

    attempts: int = Field(5, ge=1, le=20, description="tries of one request, the first one included")
    backoff: Duration = Field(timedelta(seconds=0.5), description="wait before the second try; doubled "
                              "before each next one (with random jitter: between half of it and all of it)")
    max_backoff: Duration = Field(timedelta(seconds=20), description="the longest wait between two tries")


class ObjectLockConfig(Settings):
    """S3 Object Lock: every backup object is written with a retention date matching its class."""

    mode: Literal["COMPLIANCE", "GOVERNANCE"] = Field(
        "COMPLIANCE", description="COMPLIANCE: nobody, root included, can delete or shorten it before the date; "
                                  "GOVERNANCE: identities with s3:BypassGovernanceRetention can")


class RepositorySettings(Settings):
    """What every repository has; a storage backend adds its own settings (engine/storage/<backend>.py, its
    `BACKEND.config`), and the policy picks the backend's model by the URL's scheme."""

    url: str = Field(description="file:///absolute/path, a relative path, or s3://bucket/prefix")
    lock_wait: Duration = Field(timedelta(0), description="0: a second backup fails at once; else waits this long")
    object_lock: ObjectLockConfig | None = Field(None, description="write backups immutable until their retention "
                                                 "date (a store that can lock objects: S3 with Object Lock enabled)")
    retry: RetryConfig = Field(default_factory=RetryConfig, description="retries of storage requests")

    def store_encryption(self) -> str | None:
        """The store's own encryption at rest as configured (None: the store encrypts nothing itself)."""
        return None

    def failure_domain(self, base_dir: Path) -> str:
        """What one failure or one compromised account takes down with this repository (a file system, an
        S3 account at an endpoint): an off-site copy in the same domain as the primary is not off-site."""
        return self.url


class MasterKeyConfig(Settings):
    """Where the key that encrypts the keyset comes from. Exactly one of the three."""

    env: str | None = Field(None, description="environment variable holding the master key")
    file: str | None = Field(None, description="file (mode 0600) holding the master key")
    kms_key_uri: str | None = Field(None, description="aws-kms://arn:aws:kms:REGION:ACCOUNT:key/ID")
    kms_region: str | None = None
    kms_endpoint_url: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> MasterKeyConfig:
        given = [n for n in ("env", "file", "kms_key_uri") if getattr(self, n)]
        if len(given) != 1:
            raise ValueError("give exactly one of env, file or kms_key_uri")
        if self.kms_key_uri and not self.kms_key_uri.startswith("aws-kms://"):
            raise ValueError("kms_key_uri must start with aws-kms://")
        return self


class EncryptionConfig(Settings):
    keyset: str = Field(description="path of the encrypted keyset (relative to the policy file)")
    master_key: MasterKeyConfig
    cryptoperiod: Duration = Field(timedelta(days=365), description="how long a key may stay primary "
                                   "(PCI DSS 3.7.4); `regal-backup keys rotate` starts a new one")
    cryptoperiod_warning: Duration = Field(timedelta(days=30), description="the key check warns this long "
                                           "before the cryptoperiod ends")


class CompressionConfig(Settings):
    """zstd settings for new backups (restores read whatever a backup used)."""

    level: int = Field(1, ge=-7, le=19, description="zstd level; 1 is fastest at a gzip-like ratio")
    hash_log: int | None = Field(16, ge=6, le=26, description="zstd match-table size (log2); level 1's default "
                                 "is 14; 16 gives about 0.7% smaller output for about 15% more CPU")


class ErasureSubjectConfig(Settings):
    """Where a target keeps the personal data of one kind of data subject (e.g. customers by e-mail)."""

    table: str = Field(description="schema.table")
    match_column: str = Field(description="the identifier an erasure request names (compared trimmed, lower-case)")
    action: Literal["delete", "anonymize"] = "anonymize"
    set: dict[str, str | int | float | bool | None] = Field(
        default_factory=dict, description="anonymize: column -> value; '{erasure_id}' in a text value becomes a "
                                          "short marker unique to the subject (for UNIQUE columns)")

    @model_validator(mode="after")
    def _shape(self) -> ErasureSubjectConfig:
        if "." not in self.table:
            raise ValueError("table must be schema.table")
        if self.action == "anonymize" and not self.set:
            raise ValueError("anonymize needs `set`: the columns to overwrite")
        return self


class PolicyView(Protocol):
    """What the modules below the policy (crypto, storage, the source kinds' interface) read of the assembled
    policy. engine/policy.py's `Policy` is one; they take it as this and never import the policy itself."""

    @property
    def base_dir(self) -> Path: ...  # the policy file's directory: relative paths resolve against it

    @property
    def repository(self) -> RepositorySettings: ...

    @property
    def offsite(self) -> RepositorySettings | None: ...

    @property
    def encryption(self) -> EncryptionConfig: ...

    def resolve_path(self, path: str) -> Path: ...

    def target(self, name: str) -> TargetSettings: ...


# --- cron, just enough to tell which class a tick belongs to -------------------------------------

class CronExpression:
    """A five-field cron expression (minute hour day-of-month month day-of-week, UTC)."""

    _RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))

    def __init__(self, fields: list[set[int]], dom_star: bool, dow_star: bool):
        self.fields, self.dom_star, self.dow_star = fields, dom_star, dow_star

    @classmethod
    def parse(cls, text: str) -> CronExpression:
        parts = text.split()
        if len(parts) != 5:
            raise ValueError(f"cron '{text}' needs 5 fields: minute hour day-of-month month day-of-week")
        fields = [cls._field(part, lo, hi, text) for part, (lo, hi) in zip(parts, cls._RANGES)]
        fields[4] = {d % 7 for d in fields[4]}  # 7 is Sunday too
        return cls(fields, parts[2] == "*", parts[4] == "*")

    @staticmethod
    def _field(part: str, lo: int, hi: int, text: str) -> set[int]:
        values: set[int] = set()
        for item in part.split(","):
            base, _, step_text = item.partition("/")
            try:
                step = int(step_text) if step_text else 1
                if base == "*":
                    start, end = lo, hi
                elif "-" in base:
                    start, end = (int(x) for x in base.split("-", 1))
                else:
                    start = end = int(base)
            except ValueError:
                raise ValueError(f"cron '{text}': cannot read '{item}'") from None
            if not (lo <= start <= end <= hi) or step < 1:
                raise ValueError(f"cron '{text}': '{item}' is outside {lo}-{hi}")
            values.update(range(start, end + 1, step))
        return values

    def matches(self, t: datetime) -> bool:
        minute, hour, dom, month, dow = self.fields
        if t.minute not in minute or t.hour not in hour or t.month not in month:
            return False
        dom_ok, dow_ok = t.day in dom, (t.isoweekday() % 7) in dow
        if self.dom_star or self.dow_star:  # standard cron: OR only when both are restricted
            return dom_ok and dow_ok
        return dom_ok or dow_ok

    def matches_day(self, t: datetime) -> bool:
        """Whether any minute of t's day matches (month, day of month and day of week)."""
        dom_ok, dow_ok = t.day in self.fields[2], (t.isoweekday() % 7) in self.fields[4]
        if t.month not in self.fields[3]:
            return False
        return (dom_ok and dow_ok) if self.dom_star or self.dow_star else (dom_ok or dow_ok)

    def next_match(self, at: datetime, horizon_days: int = 5 * 366) -> datetime | None:
        """The first matching minute at or after `at` (None if none within the horizon)."""
        start = at.replace(second=0, microsecond=0)
        if start < at:
            start += timedelta(minutes=1)
        day = start.replace(hour=0, minute=0)
        for _ in range(horizon_days):
            if self.matches_day(day):
                for hour in sorted(self.fields[1]):
                    for minute in sorted(self.fields[0]):
                        tick = day.replace(hour=hour, minute=minute)
                        if tick >= start:
                            return tick
            day += timedelta(days=1)
        return None


_DAYS = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]


def describe_cron(cron: str, first_in_month: bool = False) -> str:
    """A cron expression in words, for people ("every day at 02:00 UTC", "the first Sunday of each month at
    01:00 UTC"); the expression itself follows in parentheses. Unusual forms are given as the expression."""
    parts = cron.split()
    expression = CronExpression.parse(cron)
    minute, hour, _dom, _month, dow = expression.fields
    if len(minute) != 1 or parts[3] != "*":
        return f"cron {cron} (UTC)" + (", the first matching day of each month" if first_in_month else "")
    (m,) = minute
    if parts[1] == "*":
        when = f"every hour at minute {m:02d}"
    elif len(hour) == 1:
        when = f"at {next(iter(hour)):02d}:{m:02d} UTC"
    else:
        return f"cron {cron} (UTC)"
    if parts[2] == "*" and parts[4] == "*":
        days = "every day" if parts[1] != "*" else ""
    elif parts[2] == "*" and len(dow) == 1:
        day = _DAYS[next(iter(dow))]
        days = f"the first {day} of each month" if first_in_month else f"every {day}"
    elif parts[4] == "*" and parts[2].isdigit():
        days = f"day {parts[2]} of each month"
    else:
        return f"cron {cron} (UTC)"
    text = f"{days} {when}".strip() if days else when + " UTC" if "UTC" not in when else when
    return f"{text} (cron {cron})"


def is_first_match_in_month(cron: str, tick: datetime) -> bool:
    expression = CronExpression.parse(cron)
    day = tick.replace(day=1)
    while day.day < tick.day:
        if expression.matches(day):
            return False
        day += timedelta(days=1)
    return True
