"""The building blocks of the policy file: durations, cron expressions, ${VAR} references, and the
settings every target has. Each source kind defines its own target settings on `TargetSettings` in
engine/sources/<kind>/target.py; engine/policy.py puts them together."""

from __future__ import annotations

import os
import re
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from .errors import PolicyError
from .transport import Transport


class Settings(BaseModel):
    """A section of the policy file: unknown settings are errors, values never change once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


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


DataClass = Literal["payment data", "personal data", "operational data", "configuration"]


class TargetSettings(Settings):
    """What every target has; a kind adds its own settings and `kind: Literal[\"<kind>\"]`."""

    kind: str
    rpo: Duration | None = None
    rto: Duration | None = None
    description: str | None = Field(None, description="what this is, for people and the compliance report")
    data_classes: list[DataClass] = Field(default_factory=list, description="what it holds, for the report's scope")
    jobs: int | None = Field(None, ge=1, le=32, description="parallel workers for this target's backups, checks, "
                             "restores and restore tests (default: the policy's `jobs`)")

    def transports(self, name: str) -> list[Transport]:
        """The network connections a backup of this target makes, and whether each is encrypted (a kind
        that reads local files makes none)."""
        return []

    def written_password(self) -> str:
        """A password written into the policy itself for this target (its DSN's, its URL's), as written: "" when
        there is none (a ${VARIABLE} is one, as written)."""
        return ""


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
