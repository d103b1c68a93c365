"""How full the repository is, and when it will be full: the capacity condition's facts (engine/alerts.py), shown
by `status` and the metrics.

The room is the disk under a local repository, or the S3 quota the policy sets (`alerts.capacity.s3_quota_bytes`).
The growth is what the backups still in the repository stored during the forecast window (30 days by default),
from their manifests' sizes and start times, per day over the window (or, for a younger repository, over its
history, at least a day). What the prunes will delete is subtracted as it goes: each backup's retention date
(engine/retention.py `retention_verdicts`: the prune run that deletes it; a date already past counts as the next
prune) frees its stored bytes from that day on, so a repository at its retention's steady state is not forecast
full by the backups it is about to delete. A backup a condition keeps (the newest good, a legal hold, needed by an
incremental, unchecked) frees nothing; the backups still to come are counted in full (their own deletion falls
after their retention, unknown until they exist): past the retention horizon the forecast stays pessimistic,
never optimistic. No room known (S3 without a quota) or no growth: no forecast.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from .catalog import list_backups
from .crypto import Keyring
from .policy import Policy
from .storage import Repository


@dataclass
class CapacityForecast:
    used_bytes: int  # the repository's objects
    free_bytes: int | None  # room left (disk free, or quota minus used); None: no limit known
    capacity_bytes: int | None  # the disk's size or the quota
    growth_bytes_per_day: float  # over the window
    window_days: float
    days_until_full: float | None  # None: no limit known, or no growth
    freed_bytes: int = 0  # what the prunes delete before that day (their backups' retention dates)

    def to_json(self) -> dict[str, Any]:
        return {"used_bytes": self.used_bytes, "free_bytes": self.free_bytes, "capacity_bytes": self.capacity_bytes,
                "growth_bytes_per_day": round(self.growth_bytes_per_day, 1), "window_days": round(self.window_days, 3),
                "days_until_full": None if self.days_until_full is None else round(self.days_until_full, 2),
                "freed_bytes": self.freed_bytes}


def forecast(policy: Policy, repo: Repository, keyring: Keyring, now: datetime) -> CapacityForecast:
    capacity = policy.alerts.capacity
    used = repo.usage_bytes()
    free: int | None = None
    total: int | None = None
    if (space := repo.free_bytes()) is not None:
        free, total = space
    elif capacity.s3_quota_bytes:
        total, free = capacity.s3_quota_bytes, max(0, capacity.s3_quota_bytes - used)
    manifests = list_backups(repo, keyring)[0]
    since = now - capacity.forecast_window
    grown = sum(m.stored_bytes for m in manifests if m.started_at >= since)
    oldest = min((m.started_at for m in manifests), default=now)
    window = max(min(now - oldest, capacity.forecast_window), timedelta(days=1))
    window_days = window.total_seconds() / 86400
    per_day = grown / window_days
    if free is None or per_day <= 0:
        return CapacityForecast(used, free, total, per_day, window_days, None)
    sizes = {m.backup_id: m.stored_bytes for m in manifests}
    days, freed = days_until_full(free, per_day, scheduled_deletions(policy, repo, keyring, now, sizes))
    return CapacityForecast(used, free, total, per_day, window_days, days, freed)


def scheduled_deletions(policy: Policy, repo: Repository, keyring: Keyring, now: datetime,
                        sizes: dict[str, int]) -> list[tuple[float, int]]:
    """(days from now, stored bytes) of each backup retention gives a deletion date, in date order."""
    from .retention import retention_verdicts

    return sorted((max(0.0, (verdict.deletion_at - now).total_seconds() / 86400), sizes[backup_id])
                  for backup_id, verdict in retention_verdicts(policy, repo, keyring, now).items()
                  if verdict.deletion_at is not None and backup_id in sizes)


def days_until_full(free: int, per_day: float, deletions: list[tuple[float, int]]) -> tuple[float, int]:
    """The first day the growth outruns the room left plus what the prunes freed until then: (days, bytes freed)."""
    freed = 0
    for day, size in deletions:
        if per_day * day >= free + freed:  # full before this deletion
            break
        freed += size
    return (free + freed) / per_day, freed
