"""Connections and DSNs: for people a DSN is `host:port/dbname as user`, never its password; for client
programs it becomes their environment (PG* variables), never a command line."""

from __future__ import annotations

import os
import re
from typing import Any

import psycopg
from psycopg.adapt import Buffer
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.string import StrBinaryDumper, StrDumperUnknown, TextBinaryLoader, TextLoader

from ..environment import child_environment
from ..errors import RegalError
from ..transport import LOCAL, NONE, TLS, UNKNOWN, Transport, is_loopback
from .conninfo import LIBPQ_ENV

_LIBPQ_ENV = LIBPQ_ENV


def describe_dsn(dsn: str) -> str:
    """host:port/dbname as user — for people and logs; never the password."""
    try:
        p = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(unparseable DSN)"
    return f"{p.get('host', 'localhost')}:{p.get('port', 5432)}/{p.get('dbname', '?')} as {p.get('user', '?')}"


def with_dbname(dsn: str, dbname: str) -> str:
    return make_conninfo(dsn, dbname=dbname)


def database_of(dsn: str) -> str | None:
    name = conninfo_to_dict(dsn).get("dbname")
    return None if name is None else str(name)


def check_dsn_with_libpq(dsn: str) -> None:
    """ValueError saying what is wrong with a DSN, as libpq parses it (conninfo.check_dsn: the plain ones without
    it)."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "it cannot be parsed"
        raise ValueError(f"not a PostgreSQL DSN ({reason}): write postgresql://user@host:port/dbname or "
                         "'host=... dbname=... user=...'") from None
    unsupported = sorted(set(params) - set(_LIBPQ_ENV))
    if unsupported:
        raise ValueError(f"the DSN parameter(s) {', '.join(unsupported)} are not supported; use "
                         f"{', '.join(sorted(_LIBPQ_ENV))}")


def libpq_environment(dsn: str) -> dict[str, str]:
    """The environment for a PostgreSQL client program: the allowlist, the libpq variables of this process's
    environment (PGPASSWORD, PGPASSFILE, PGSSLMODE...: what an in-process connection to `dsn` uses too, so
    that a child connects as it does) and, over them, the DSN's PG* variables. Never a command line."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        raise RegalError("the DSN cannot be parsed", "write it as postgresql://user@host:port/dbname") from None
    env = child_environment(**{name: os.environ[name] for name in _LIBPQ_ENV.values() if name in os.environ})
    for key, value in params.items():
        if key not in _LIBPQ_ENV:
            raise RegalError(f"the DSN parameter '{key}' is not supported for backups", "remove it from the DSN")
        env[_LIBPQ_ENV[key]] = str(value)
    return env


def apply_settings(conn: psycopg.Connection[Any], settings: dict[str, str]) -> None:
    """Set session settings in one round trip (outside any transaction: it takes no snapshot then)."""
    conn.execute("SELECT count(set_config(name, value, false)) FROM unnest(%s::text[], %s::text[]) AS s(name, value)",
                 (list(settings), list(settings.values())))


# Every session of ours sets these first, as pg_dump does: a database or role with a short statement, lock or
# idle-in-transaction timeout must not cut a backup, a restore or a check short.
NO_TIMEOUTS = {"statement_timeout": "0", "lock_timeout": "0", "idle_in_transaction_session_timeout": "0"}
# What our own sessions in a restored database set over the settings it carries (restored as the source had
# them, its roles' ones included): a database that is read-only by default must not fail pg_amcheck or the
# GDPR erasures that run in it once it is loaded, and a row-level security policy must not hide a row from an
# erasure (or from its count of what remains): the statement fails instead.
OWN_SESSION_SETTINGS = {**NO_TIMEOUTS, "default_transaction_read_only": "off", "row_security": "off"}


def startup_options(given: str | None, settings: dict[str, str]) -> str:
    """libpq's `options` (PGOPTIONS): `settings` after the `given` ones, applied before the first statement."""
    def escaped(text: str) -> str:
        return text.replace("\\", "\\\\").replace(" ", "\\ ")

    return " ".join([*([given] if given else []), *(f"-c {escaped(f'{k}={v}')}" for k, v in settings.items())])


def refuses_startup_options(message: str) -> bool:
    """Whether a connection failed because a pooler in front of the server (PgBouncer) refuses libpq's
    `options`: the settings must then be SET in the session, or (when only for speed) left out."""
    return "unsupported startup parameter" in message


def with_session_settings(env: dict[str, str], settings: dict[str, str]) -> dict[str, str]:
    """A client program's environment (libpq_environment) whose sessions start with `settings`, after any
    options the DSN gave."""
    env["PGOPTIONS"] = startup_options(env.get("PGOPTIONS"), settings)
    return env


def connect(dsn: str, *, autocommit: bool = False, settings: dict[str, str] | None = None,
            **kwargs: Any) -> psycopg.Connection[Any]:
    """A session in UTF-8 (names and values come back as text whatever the database's encoding; sessions
    that read or write rows or names in the database's own encoding set it themselves: on a SQL_ASCII
    database text then reads and writes as its own bytes, see read_text_as_bytes_are), without timeouts
    (NO_TIMEOUTS) and with `settings` from its first statement on, whatever the database or role sets."""
    kwargs.setdefault("client_encoding", "UTF8")
    settings = {**NO_TIMEOUTS, **(settings or {})}
    given = conninfo_to_dict(dsn).get("options")
    try:
        try:  # the settings as startup options: in force before the first statement, which a timeout could cut
            conn = psycopg.connect(dsn, connect_timeout=10, autocommit=autocommit, **kwargs,
                                   options=startup_options(None if given is None else str(given), settings))
        except psycopg.OperationalError as exc:
            if not refuses_startup_options(str(exc)):  # else SET them
                raise
            conn = psycopg.connect(dsn, connect_timeout=10, autocommit=True, **kwargs)
            try:
                apply_settings(conn, settings)
                conn.autocommit = autocommit
            except BaseException:
                conn.close()
                raise
    except psycopg.OperationalError as exc:
        reason = connection_failure(str(exc)) or type(exc).__name__
        if "password" in reason.lower():
            reason = "authentication failed"
        if "conversion between UTF8 and" in reason:
            raise RegalError(f"the database at {describe_dsn(dsn)} is in an encoding PostgreSQL cannot convert to "
                             f"UTF-8 ({reason}), in which regal-backup reads names and settings",
                             "back the server up with a `postgres_cluster` target (base backups and WAL are copied "
                             "byte for byte, whatever the encoding), or convert the database to UTF8") from None
        raise RegalError(f"cannot connect to PostgreSQL at {describe_dsn(dsn)}: {reason}",
                         "check that the server is up and reachable, and the DSN and credentials in the "
                         "policy") from None
    if conn.info.parameter_status("server_encoding") == "SQL_ASCII":
        read_text_as_bytes_are(conn)
    return conn


_HOST_FAILURE = re.compile(r"- host: '(?P<host>[^']*)', port: '(?P<port>[^']*)', hostaddr: [^:]*: (?P<why>.*)")


def connection_failure(text: str) -> str:
    """Why a connection failed, in one line: each host's own reason when libpq tried several (a multi-host DSN:
    "host A port P: why; host B ..."), else the server's or libpq's words (not the hint after them)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    hosts = [m for line in lines if (m := _HOST_FAILURE.match(line.strip()))]
    if hosts:
        return "every host failed: " + "; ".join(
            f"host {m['host']} port {m['port']}: {m['why'].removeprefix('connection is bad: ')}" for m in hosts)
    said = [line.strip() for line in lines if not line[0].isspace()]
    return (said or [line.strip() for line in lines] or [""])[-1]


# --- names as the database's own bytes ---------------------------------------------------------------------
# A SQL_ASCII database stores names and text as whatever bytes it was sent: a table may be named with bytes
# that are valid in no encoding (LATIN1 bytes sent by a client that said SQL_ASCII). The server refuses to send
# such a name to a UTF-8 session ("invalid byte sequence for encoding UTF8"); pg_dump reads and writes it in the
# database's own encoding, as bytes. Our sessions that handle names on such a database do the same: their
# client_encoding is SQL_ASCII (client_encoding_for), and a name is held in Python as its bytes read as UTF-8,
# each byte that is not valid UTF-8 as a lone surrogate (U+DC80..U+DCFF, Python's `surrogateescape`): a valid
# UTF-8 name reads as it is, any other round-trips byte for byte (name_bytes). Outside Python (the manifest,
# messages) such a name is written readably by readable_name and exactly by its bytes.
NAME_CODEC = "utf-8"


def name_bytes(name: str) -> bytes:
    """A name's bytes in a SQL_ASCII database (its UTF-8 for a name that is valid text)."""
    return name.encode(NAME_CODEC, "surrogateescape")


def name_from_bytes(raw: bytes) -> str:
    return raw.decode(NAME_CODEC, "surrogateescape")


def is_text(name: str) -> bool:
    """Whether a name is valid Unicode text (not one holding bytes that are valid in no encoding)."""
    return not any("\udc80" <= c <= "\udcff" for c in name)


def readable_name(name: str) -> str:
    """A name for people and documents: each byte that is not valid UTF-8 written as \\xNN."""
    return name if is_text(name) else name_bytes(name).decode(NAME_CODEC, "backslashreplace")


def session_codec(conn: psycopg.Connection[Any]) -> str:
    """The Python codec of a session's client encoding: UTF-8 (with surrogateescape, see above) for SQL_ASCII,
    in which the server sends and takes bytes as they are."""
    codec = conn.info.encoding
    return NAME_CODEC if codec == "ascii" else codec


def encoded(conn: psycopg.Connection[Any], statement: str) -> bytes:
    """A statement as this session must send it: its names in the session's client encoding, a name of a
    SQL_ASCII database as its own bytes (psycopg would refuse any non-ASCII character in a SQL_ASCII session)."""
    return statement.encode(session_codec(conn), "surrogateescape")


def _codec_of(connection: Any) -> str:
    return NAME_CODEC if connection is None else session_codec(connection)


class _NameLoader(TextLoader):
    def load(self, data: Buffer) -> str:
        return bytes(data).decode(_codec_of(self.connection), "surrogateescape")


class _NameBinaryLoader(TextBinaryLoader):
    def load(self, data: Buffer) -> str:
        return bytes(data).decode(_codec_of(self.connection), "surrogateescape")


class _NameDumper(StrDumperUnknown):
    def dump(self, obj: str) -> Buffer | None:
        return obj.encode(_codec_of(self.connection), "surrogateescape")


class _NameBinaryDumper(StrBinaryDumper):
    def dump(self, obj: str) -> Buffer | None:
        return obj.encode(_codec_of(self.connection), "surrogateescape")


def read_text_as_bytes_are(conn: psycopg.Connection[Any]) -> None:
    """On a SQL_ASCII database: text values (names included) read as str whatever the session's client encoding,
    each byte of a SQL_ASCII session that is not valid UTF-8 as a lone surrogate, and such a str sent back as those
    bytes (psycopg alone returns bytes for text in a SQL_ASCII session, and cannot send a non-ASCII str)."""
    for type_name in ("text", "name", "varchar", "bpchar", '"char"'):
        conn.adapters.register_loader(type_name, _NameLoader)
        conn.adapters.register_loader(type_name, _NameBinaryLoader)
    conn.adapters.register_dumper(str, _NameBinaryDumper)
    conn.adapters.register_dumper(str, _NameDumper)  # the last registered is the default, as psycopg's own


def server_major(conn: psycopg.Connection[Any]) -> int:
    return conn.info.server_version // 10000


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_ENCRYPTING_SSLMODES = ("require", "verify-ca", "verify-full")


def dsn_transport(connection: str, dsn: str) -> Transport:
    """Whether a libpq DSN makes its connection encrypted (see engine/transport.py); never its password."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return Transport(connection, UNKNOWN, "the DSN cannot be parsed")
    hosts = [h for h in str(params.get("host") or "").split(",") if h] or [""]
    where = f"{connection}: PostgreSQL {describe_dsn(dsn)}"
    sslmode, gssencmode = params.get("sslmode"), params.get("gssencmode")
    if sslmode in _ENCRYPTING_SSLMODES:
        verified = "server verified" if sslmode != "require" else "server certificate not verified"
        return Transport(where, TLS, f"sslmode={sslmode} ({verified})")
    if gssencmode == "require":
        return Transport(where, TLS, "gssencmode=require (GSSAPI encryption)")
    sockets = all(h == "" or h.startswith("/") for h in hosts) and not params.get("hostaddr")
    if sockets or all(h.startswith("/") or is_loopback(h) for h in hosts):
        return Transport(where, LOCAL, "Unix socket" if sockets else "loopback address")
    return Transport(where, NONE, f"sslmode={sslmode}" if sslmode else
                     "sslmode not set (libpq's default `prefer` encrypts only if the server offers TLS)")
