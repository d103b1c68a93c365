"""The policy settings of a `postgres_cluster` target: one server, all its databases, backed up physically."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from ...errors import PolicyError
from ...postgresql.connection import check_dsn
from ...settings import TargetSettings, fill_environment
from ...transport import Transport


class PostgresClusterTarget(TargetSettings):
    kind: Literal["postgres_cluster"]
    dsn: str = Field(description="libpq URI or key=value string of a role that may replicate (REPLICATION, or "
                                 "a superuser); ${VAR} is read from the environment")
    slot: str = Field("regal_backup", description="the physical replication slot `wal stream` holds (created "
                                                  "by it when missing), so the server keeps WAL until it is stored")

    @field_validator("dsn")
    @classmethod
    def _valid_dsn(cls, dsn: str) -> str:
        check_dsn(dsn)
        return dsn

    @field_validator("slot")
    @classmethod
    def _valid_slot(cls, slot: str) -> str:
        if not re.fullmatch(r"[a-z0-9_]{1,63}", slot):
            raise ValueError(f"'{slot}' is not a replication slot name: use lower-case letters, digits and _")
        return slot

    def resolved_dsn(self) -> str:
        return fill_environment(self.dsn, "dsn")

    def transports(self, name: str) -> list[Transport]:
        from ...postgresql.connection import dsn_transport

        try:
            dsn = self.resolved_dsn()
        except PolicyError:
            dsn = self.dsn
        return [dsn_transport(f"target {name}", dsn)]
