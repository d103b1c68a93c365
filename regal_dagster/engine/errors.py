"""Errors that tell the operator what happened and what to do next."""

from __future__ import annotations


class RegalError(Exception):
    """An operational error with a hint for the operator. Never carries secrets."""

    exit_code = 1
    # A refusal that protected data (a key still in use, a restore into a database that holds data): the
    # audit trail records it as refused, and reports do not count it as a failed operation.
    protective = False

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  what to do: {self.hint}" if self.hint else self.message


class PolicyError(RegalError):
    """The policy file is missing or invalid; `problems` lists each one by its path."""

    exit_code = 2

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        listing = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            f"policy file {path} is invalid:\n{listing}",
            "fix the listed entries (see docs/policy.md for every setting)",
        )


class UsageError(RegalError):
    """The command cannot work as given (exit 2): no repository where the policy points, a bad argument, a
    report period in the future."""

    exit_code = 2


class EncryptionKeyError(RegalError):
    """The encryption keys cannot be loaded or do not fit the data."""


class LockedError(RegalError):
    """Another backup of the same target holds the lock."""


class ObjectLockedError(RegalError):
    """An object is under S3 Object Lock: it cannot be deleted before its retention date."""


class IntegrityError(RegalError):
    """Stored bytes do not match what the manifest promises."""

    exit_code = 3


class ToolError(RegalError):
    """An external program (pg_dump, pg_restore, ...) is missing or failed."""


class MissingSoftwareError(ToolError):
    """This machine lacks a program a command needs (no PostgreSQL server installation that can hold a source,
    no pg_restore new enough): a problem of the environment, never a finding about a backup's data (a restore
    test that meets it is not recorded: the command fails instead, exit 1)."""


class TargetNotEmptyError(UsageError):
    """A restore target already holds data (exit 2: nothing was touched; restore elsewhere or say
    --drop-existing)."""

    protective = True


class KeyInUseError(EncryptionKeyError):
    """A key cannot be retired: it is the primary key, or backups still need it (nothing was changed)."""

    protective = True


