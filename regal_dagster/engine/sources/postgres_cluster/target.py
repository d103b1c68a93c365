"""The policy settings of a `postgres_cluster` target: one server, all its databases, backed up physically."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from ..postgres.target import ReplicatedTarget


class PostgresClusterTarget(ReplicatedTarget):
    kind: Literal["postgres_cluster"]
    dsn: str = Field(description="libpq URI or key=value string of a role that may replicate (REPLICATION, or "
                                 "a superuser); ${VAR} is read from the environment")
    slot: str = Field("regal_backup", description="the physical replication slot `wal stream` holds (created "
                                                  "by it when missing), so the server keeps WAL until it is stored")
    incremental: bool = Field(False, description="scheduled hourly and daily base backups are incremental "
                                                 "(pg_basebackup --incremental, PostgreSQL 17+ with summarize_wal = "
                                                 "on) on top of the newest one; weekly and monthly stay full")
    restore_point_facts: bool = Field(True, description="restore tests create a named restore point on the server "
                                                        "(pg_create_restore_point) and record facts there that a "
                                                        "recovery to it must match exactly; false: restore tests "
                                                        "never touch the server, only the repository")

    backup_from: Literal["primary", "standby", "prefer-standby"] = Field(
        "primary", description="where base backups (full and incremental) run: primary; standby (the first healthy, "
                               "caught-up one of `standbys`, else the backup fails naming each and why); "
                               "prefer-standby (such a standby, else the primary, saying why). The WAL stream and "
                               "restore tests' restore points always use the primary (`dsn`)")

    @field_validator("slot")
    @classmethod
    def _valid_slot(cls, slot: str) -> str:
        if not re.fullmatch(r"[a-z0-9_]{1,63}", slot):
            raise ValueError(f"'{slot}' is not a replication slot name: use lower-case letters, digits and _")
        return slot
