"""The policy settings of a `postgres_cluster` target: one server, all its databases, backed up physically."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from typing import Literal

from pydantic import Field, field_validator

from ...errors import PolicyError
from ...settings import fill_environment
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

    def restores_onto_itself(self, destination: str, describe: Callable[[str], str]) -> bool:
        """A point-in-time restore writes a new data directory on this machine: it lands on the production server's
        own host when the server, or one of its standbys, runs here (a Unix socket, a loopback address, this
        machine's name or one of its addresses), or when a host cannot be told (a ${VARIABLE} not set here)."""
        return any(_runs_here(dsn) for dsn in [self.dsn, *self.standbys])

    @field_validator("slot")
    @classmethod
    def _valid_slot(cls, slot: str) -> str:
        if not re.fullmatch(r"[a-z0-9_]{1,63}", slot):
            raise ValueError(f"'{slot}' is not a replication slot name: use lower-case letters, digits and _")
        return slot


def _runs_here(dsn: str) -> bool:
    """The server a DSN names runs on this machine (each host of a multi-host DSN counts; unknown: yes)."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(fill_environment(dsn, "dsn"))
    except (PolicyError, ValueError, TypeError):  # a ${VARIABLE} not set here, a DSN libpq refuses: cannot tell
        return True
    hosts = str(params.get("host") or params.get("hostaddr") or "").split(",")
    here = {socket.gethostname().lower(), socket.getfqdn().lower(), "localhost"}
    try:
        addresses = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        addresses = set()
    for host in hosts:
        host = host.strip().lower()
        if not host or host.startswith(("/", "@")) or host in here or host in addresses:
            return True
        try:
            if ipaddress.ip_address(host).is_loopback:
                return True
        except ValueError:
            pass
    return False
