"""How full the repository is, and when it will be full: the capacity condition's facts (engine/alerts.py), shown
by `status` and the metrics.

The room is the disk under a local repository, or the S3 quota the policy sets (`alerts.capacity.s3_quota_bytes`).
The growth is what the backups still in the repository stored during the forecast window (30 days by default),
from their manifests' sizes and start times, per day over the window (or, for a younger repository, over its
history, at least a day). Backups pruned since are not subtracted: a repository at its retention's steady state
is forecast pessimistically, never optimistically. No room known (S3 without a quota) or no growth: no forecast.
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

    def to_json(self) -> dict[str, Any]:
        return {"used_bytes": self.used_bytes, "free_bytes": self.free_bytes, "capacity_bytes": self.capacity_bytes,
                "growth_bytes_per_day": round(self.growth_bytes_per_day, 1), "window_days": round(self.window_days, 3),
                "days_until_full": None if self.days_until_full is None else round(self.days_until_full, 2)}


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
    days = free / per_day if free is not None and per_day > 0 else None
    return CapacityForecast(used, free, total, per_day, window_days, days)
