"""How every command writes a duration and a size for people: the progress display, the result lines and
the summaries the engine writes for them (a restore's) say them one way (one decimal under 10 s, then whole
seconds, minutes, hours, days; bytes in binary units, B to GiB)."""

from __future__ import annotations


def duration(seconds: float | None) -> str:
    """A duration for people: 0.4 s, 4.4 s, 45 s, 12 min, 3.5 h, 2.1 d."""
    if seconds is None:
        return "-"
    if seconds < 9.95:  # what would round to "10.0 s" reads "10 s"
        return f"{seconds:.1f} s"
    if seconds < 59.5:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def size(n: float) -> str:
    """A size for people: 512 B, 12.3 KiB, 80.1 MiB, 1.2 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def mib(n: float) -> str:
    """Sizes in a progress display: always MiB, so that the numbers compare at a glance."""
    return f"{n / 1048576:.1f} MiB"
