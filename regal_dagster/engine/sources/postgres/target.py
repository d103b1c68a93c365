"""The policy settings of a `postgres` target: one database, backed up logically."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...settings import TargetSettings, fill_environment


class PostgresTarget(TargetSettings):
    kind: Literal["postgres"]
    dsn: str = Field(description="libpq URI or key=value string; ${VAR} is read from the environment")

    def resolved_dsn(self) -> str:
        return fill_environment(self.dsn, "dsn")
