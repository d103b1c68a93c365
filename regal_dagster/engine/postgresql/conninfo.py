"""The common DSNs read without libpq: the policy checks every target's DSN when it is loaded, and `status`,
`list` or `wal push` load the policy without connecting anywhere, so they should not pay psycopg's import
(a fifth of a second of CPU) to split a string.

`simple_conninfo` understands the plain forms (key=value words, quoted or not, and a single-host
postgresql:// URI with percent-escapes) and gives up (None) on anything else, which then goes to libpq
(connection.py): it never accepts a DSN libpq would refuse, and where it answers, it answers as libpq does
(tests/test_startup.py compares them on a corpus).
"""

from __future__ import annotations

import re
from urllib.parse import unquote

# what libpq's variables a DSN's parameters become in a client program's environment (connection.py); the
# parameters a policy's DSN may use
LIBPQ_ENV = {
    "host": "PGHOST", "hostaddr": "PGHOSTADDR", "port": "PGPORT", "dbname": "PGDATABASE", "user": "PGUSER",
    "password": "PGPASSWORD", "passfile": "PGPASSFILE", "sslmode": "PGSSLMODE", "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT", "sslkey": "PGSSLKEY", "sslcrl": "PGSSLCRL", "connect_timeout": "PGCONNECT_TIMEOUT",
    "application_name": "PGAPPNAME", "options": "PGOPTIONS", "channel_binding": "PGCHANNELBINDING",
    "gssencmode": "PGGSSENCMODE", "target_session_attrs": "PGTARGETSESSIONATTRS", "service": "PGSERVICE",
    "sslnegotiation": "PGSSLNEGOTIATION", "require_auth": "PGREQUIREAUTH",
}
_URI_PREFIXES = ("postgresql://", "postgres://")
_KEY = re.compile(r"[a-z_]+")
_WORD = re.compile(r"\s*([a-z_]+)\s*=\s*")
_HOST = re.compile(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]")
_PORT = re.compile(r"[0-9]+")
_ESCAPES = re.compile(r"%(?![0-9A-Fa-f]{2})")


def check_dsn(dsn: str) -> None:
    """ValueError saying what is wrong with a DSN (its ${VAR} references are not filled: they may stay). A plain
    DSN of supported parameters passes here; anything else is libpq's to judge (connection.check_dsn)."""
    if simple_conninfo(dsn) is None:
        from .connection import check_dsn_with_libpq

        check_dsn_with_libpq(dsn)


def simple_conninfo(dsn: str) -> dict[str, str] | None:
    """The DSN's parameters as libpq parses them, or None when the DSN is not of a plain form or names a parameter
    a policy may not use."""
    params = _uri(dsn.split("://", 1)[1]) if dsn.startswith(_URI_PREFIXES) else _words(dsn)
    return params if params is not None and set(params) <= set(LIBPQ_ENV) else None


def _words(dsn: str) -> dict[str, str] | None:
    params: dict[str, str] = {}
    at = 0
    while at < len(dsn):
        if dsn[at:].strip() == "":
            break
        key = _WORD.match(dsn, at)
        if key is None:
            return None
        at = key.end()
        value = []
        if dsn.startswith("'", at):
            at += 1
            while True:
                if at >= len(dsn):
                    return None  # unterminated quote: libpq says so
                char = dsn[at]
                if char == "\\" and at + 1 < len(dsn):
                    value.append(dsn[at + 1])
                    at += 2
                elif char == "'":
                    at += 1
                    break
                else:
                    value.append(char)
                    at += 1
            if at < len(dsn) and not dsn[at].isspace():
                return None
        else:
            while at < len(dsn) and not dsn[at].isspace():
                if dsn[at] in "\\'":
                    return None
                value.append(dsn[at])
                at += 1
        params[key.group(1)] = "".join(value)
    return params


def _uri(rest: str) -> dict[str, str] | None:
    rest, _, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    if "@" in path + query or authority.count("@") > 1 or _ESCAPES.search(rest + query) or "#" in rest + query:
        return None
    params: dict[str, str] = {}
    userinfo, at, hostport = authority.rpartition("@")
    if at:
        user, _, password = userinfo.partition(":")
        if user:
            params["user"] = unquote(user)
        if password:
            params["password"] = unquote(password)
    if hostport:
        host = _HOST.match(hostport)
        if host is None:
            return None
        port = hostport[host.end():]
        if port and not (port.startswith(":") and _PORT.fullmatch(port[1:])):
            return None
        params["host"] = host.group().strip("[]")
        if port:
            params["port"] = port[1:]
    if slash and path:
        params["dbname"] = unquote(path)
    for pair in query.split("&") if query else []:
        key, equals, value = pair.partition("=")
        if not equals or not _KEY.fullmatch(key) or "=" in value:
            return None
        params[key] = unquote(value)
    return params
