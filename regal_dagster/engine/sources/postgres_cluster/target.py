"""The policy settings of a `postgres_cluster` target: one server, all its databases, backed up physically."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

from ...postgresql.conninfo import check_dsn
from ...settings import Duration, fill_environment
from ...transport import Transport
from ..postgres.target import DsnTarget


class PostgresClusterTarget(DsnTarget):
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

    standbys: list[str] = Field(default_factory=list, description="libpq DSNs of the server's streaming standbys "
                                "(same role rules as `dsn`; ${VAR} read from the environment): where base backups "
                                "may run, so that the primary does not pay for them (`backup_from`)")
    backup_from: Literal["primary", "standby", "prefer-standby"] = Field(
        "primary", description="where base backups (full and incremental) run: primary; standby (the first healthy, "
                               "caught-up one of `standbys`, else the backup fails naming each and why); "
                               "prefer-standby (such a standby, else the primary, saying why). The WAL stream and "
                               "restore tests' restore points always use the primary (`dsn`)")
    standby_max_lag: Duration = Field(timedelta(seconds=30), description="a standby is caught up when it replays "
                                      "the primary's current WAL position within this time (the backup waits that "
                                      "long at most); one that does not lags too far behind for a backup")

    @field_validator("standbys")
    @classmethod
    def _valid_standbys(cls, standbys: list[str]) -> list[str]:
        for dsn in standbys:
            check_dsn(dsn)
        return standbys

    @model_validator(mode="after")
    def _standbys_for_backup_from(self) -> Self:
        if self.backup_from != "primary" and not self.standbys:
            raise ValueError(f"backup_from: {self.backup_from} needs the standbys' DSNs: add `standbys:` (a list), "
                             "or set backup_from: primary")
        return self

    def resolved_standbys(self) -> list[str]:
        return [fill_environment(dsn, f"standbys[{i}]") for i, dsn in enumerate(self.standbys)]

    def transports(self, name: str) -> list[Transport]:
        from ...errors import PolicyError
        from ...postgresql.connection import dsn_transport

        found = super().transports(name)
        for i, dsn in enumerate(self.standbys):
            try:
                dsn = fill_environment(dsn, f"standbys[{i}]")
            except PolicyError:
                pass  # a ${VAR} not set here: judge what the policy itself says
            found.append(dsn_transport(f"target {name} standby {i + 1}", dsn))
        return found

    @field_validator("slot")
    @classmethod
    def _valid_slot(cls, slot: str) -> str:
        if not re.fullmatch(r"[a-z0-9_]{1,63}", slot):
            raise ValueError(f"'{slot}' is not a replication slot name: use lower-case letters, digits and _")
        return slot
