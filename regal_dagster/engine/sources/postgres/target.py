"""The policy settings of a `postgres` target: one database, backed up logically."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Literal, Self

from pydantic import Field, field_validator, model_validator

from ...errors import PolicyError
from ...postgresql.conninfo import check_dsn, simple_conninfo
from ...settings import Duration, TargetSettings, fill_environment
from ...transport import Transport

if TYPE_CHECKING:
    from ...postgresql.standby import BackupServer


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
        params: dict[str, str] | None = simple_conninfo(self.dsn)  # read without libpq: the policy loads light
        if params is None:
            from psycopg.conninfo import conninfo_to_dict

            params = {k: str(v) for k, v in conninfo_to_dict(self.dsn).items() if v is not None}
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


class ReplicatedTarget(DsnTarget):
    """A target whose server may have streaming standbys that backups can read from (`backup_from`)."""

    standbys: list[str] = Field(default_factory=list, description="libpq DSNs of the server's streaming standbys "
                                "(same role rules as `dsn`; ${VAR} read from the environment): where backups may "
                                "read, so that the primary does not pay for them (`backup_from`)")
    backup_from: Literal["primary", "standby", "prefer-standby"] = Field(
        "primary", description="where backups read: primary; standby (the first healthy, caught-up one of `standbys`, "
                               "else the backup fails naming each and why); prefer-standby (such a standby, else the "
                               "primary, saying why)")
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

    def backup_server(self, what: str = "base backup", *, checkpoint: bool = True,
                      min_version_num: int = 0) -> BackupServer:
        """The server the next backup reads from (postgresql/standby.py)."""
        from ...postgresql.standby import backup_server

        return backup_server(self.resolved_dsn(), self.resolved_standbys(), self.backup_from,
                             self.standby_max_lag.total_seconds(), what=what, checkpoint=checkpoint,
                             min_version_num=min_version_num)

    def transports(self, name: str) -> list[Transport]:
        from ...postgresql.connection import dsn_transport

        found = super().transports(name)
        for i, dsn in enumerate(self.standbys):
            try:
                dsn = fill_environment(dsn, f"standbys[{i}]")
            except PolicyError:
                pass  # a ${VAR} not set here: judge what the policy itself says
            found.append(dsn_transport(f"target {name} standby {i + 1}", dsn))
        return found


class PostgresTarget(ReplicatedTarget):
    kind: Literal["postgres"]
    dsn: str = Field(description="libpq URI or key=value string; ${VAR} is read from the environment")
    lock_timeout: float = Field(60.0, gt=0, description="seconds a backup waits for its ACCESS SHARE lock on a table "
                                "another session holds exclusively (ALTER TABLE, TRUNCATE, ...) before failing "
                                "with that session's pid, application and statement")
    role_passwords: bool = Field(False, description="also record the password hashes of the roles the database "
                                 "refers to (needs a superuser), so a restore onto a fresh server recreates them "
                                 "with their passwords; without it they are created without one (NOLOGIN stays)")
    backup_from: Literal["primary", "standby", "prefer-standby"] = Field(
        "primary", description="where the dump reads: primary; standby (the first healthy, caught-up one of "
                               "`standbys`, from PostgreSQL 10: it exports its snapshot there and takes its locks "
                               "there, none on the primary; else the backup fails naming each and why); "
                               "prefer-standby (such a standby, else the primary, saying why; also the primary again "
                               "when replay on the standby cancelled the dump: a conflict with recovery)")
