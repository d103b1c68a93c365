"""What a check finds, and what a check is: shared by the generic checks (engine/checks.py) and the checks
a source kind adds (its `checks` in engine/sources/<kind>/); which checks there are: the common ones here,
each kind's as sources/discovery.py finds them (it knows no Source type, so there is no circle through it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .sources.discovery import kinds, load_source, loaded_sources

ERROR, WARN = "ERROR", "WARN"


@dataclass(frozen=True)
class CheckSpec:
    """A check every backup of a kind gets. `decides_good`: a failure makes the backup not good (it blocks
    in Dagster and no longer counts for the RPO, retention or restore tests)."""

    severity: str  # ERROR | WARN
    decides_good: bool
    description: str  # for people: what it proves
    bounds_recovery: bool = False  # a failure names what recovery cannot pass: every point past it is unrecoverable
    # (engine/recoverability.py), though the backup itself stays good (WAL continuity)


@dataclass
class CheckOutcome:
    name: str
    passed: bool
    description: str  # what was found, for people
    failing_object: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    level: str | None = None  # a severity other than the check's usual one (key_cryptoperiod: ERROR once past)

    @property
    def severity(self) -> str:
        """ERROR or WARN: the check's usual severity (common or its kind's), unless this outcome says otherwise."""
        return self.level or check_spec(self.name).severity


# The checks every backup gets. A kind adds its own (its Source's `checks`, e.g. Redis persistence).
# `decides_good`: only these say whether the backup itself can be trusted, decide "good" and block in
# Dagster; the key's age and the off-site copy are about the setup around it: they alert, nothing more.
COMMON_CHECKS = {
    "manifest": CheckSpec(ERROR, True, "The manifest's checksum holds and every object it lists exists with its "
                                       "size."),
    "integrity": CheckSpec(ERROR, True, "Every stored byte is read back, authenticated, decompressed and matches "
                                        "both SHA-256 sums; the objects parse as what they claim to be."),
    "encryption": CheckSpec(ERROR, True, "Every object is in the encrypted format under a key the keyset holds; "
                                         "no plaintext of the source in samples of the stored bytes; server-side "
                                         "encryption on S3."),
    "size": CheckSpec(WARN, False, "The backup's size is close to the recent good backups' (a sudden change is "
                                   "worth a look)."),
    "key_cryptoperiod": CheckSpec(WARN, False, "The primary encryption key is within its cryptoperiod (PCI DSS "
                                               "3.7.4): WARN as the end nears, ERROR past it."),
    "offsite_copy": CheckSpec(ERROR, False, "The backup is in the off-site repository, every object read back there "
                                            "with the same SHA-256 as here, and the same manifest."),
}


def check_spec(name: str) -> CheckSpec:
    """The spec of a check, common or a kind's own."""
    if name in COMMON_CHECKS:
        return COMMON_CHECKS[name]
    for source in loaded_sources():  # a kind's check names are its own: the first place to look is in use
        if name in source.checks:
            return source.checks[name]
    for kind in kinds():
        specs: dict[str, CheckSpec] = load_source(kind).checks
        if name in specs:
            return specs[name]
    raise KeyError(name)


def bounds_recovery(name: str) -> bool:
    """Whether a failure of the check `name` marks the recovery points past what it names unrecoverable."""
    try:
        return check_spec(name).bounds_recovery
    except KeyError:  # a check this version does not know (a record of an older or newer one)
        return False
