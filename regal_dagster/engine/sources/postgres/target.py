"""The policy settings of a `postgres` target: one database, backed up logically."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ...errors import PolicyError
from ...postgresql.conninfo import check_dsn
from ...settings import TargetSettings, fill_environment
from ...transport import Transport


class DsnTarget(TargetSettings):
    """A target reached through a libpq DSN: checked when the policy is read, ${VAR} filled in when used."""

    dsn: str

    @field_validator("dsn")
    @classmethod
    def _valid_dsn(cls, dsn: str) -> str:
        check_dsn(dsn)
        return dsn

    def resolved_dsn(self) -> str:
        return fill_environment(self.dsn, "dsn")

    def own_location(self) -> str | None:
        try:
            return self.resolved_dsn()
        except PolicyError:
            return self.dsn

    def written_password(self) -> str:
        from psycopg.conninfo import conninfo_to_dict

        return str(conninfo_to_dict(self.dsn).get("password") or "")

    def endpoint(self) -> str | None:
        """host:port of the server, as the DSN writes it (no host: `local`, libpq's Unix socket); None when the
        host or port is a ${VARIABLE}."""
        from psycopg.conninfo import conninfo_to_dict

        params = conninfo_to_dict(self.dsn)
        host = str(params.get("host") or params.get("hostaddr") or "local")
        port = str(params.get("port") or "5432")
        if "${" in host or "${" in port:
            return None
        return f"{host}:{port}"

    def transports(self, name: str) -> list[Transport]:
        from ...postgresql.connection import dsn_transport

        try:
            dsn = self.resolved_dsn()
        except PolicyError:
            dsn = self.dsn  # a ${VAR} not set here: judge what the policy itself says
        return [dsn_transport(f"target {name}", dsn)]


class PostgresTarget(DsnTarget):
    kind: Literal["postgres"]
    dsn: str = Field(description="libpq URI or key=value string; ${VAR} is read from the environment")
    lock_timeout: float = Field(60.0, gt=0, description="seconds a backup waits for its ACCESS SHARE lock on a table "
                                "another session holds exclusively (ALTER TABLE, TRUNCATE, ...) before failing "
                                "with that session's pid, application and statement")
    role_passwords: bool = Field(False, description="also record the password hashes of the roles the database "
                                 "refers to (needs a superuser), so a restore onto a fresh server recreates them "
                                 "with their passwords; without it they are created without one (NOLOGIN stays)")
