"""Encryption in transit, as configured: for every connection that carries backup data (the sources, the
repositories, the audit database, the key service), whether the policy makes it use TLS.

Judged from the settings alone (a DSN's `sslmode`, a URL's scheme), so a report can say exactly which
connections are encrypted without connecting: `require`, `verify-ca` and `verify-full` (or a GSSAPI
`gssencmode=require`) encrypt a PostgreSQL connection; `prefer`, the libpq default, encrypts only when the
server happens to offer TLS, so it does not count. Connections that never leave the host (Unix sockets,
loopback addresses, local files) are listed as such.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

TLS, LOCAL, NONE, UNKNOWN = "TLS", "local", "none", "unknown"


@dataclass(frozen=True)
class Transport:
    connection: str  # for people: what connects to what ("target pos: PostgreSQL db.example.com:5432")
    protection: str  # TLS | local (never leaves this host) | none | unknown
    how: str  # the setting that decides it ("sslmode=verify-full")

    def to_json(self) -> dict[str, str]:
        return {"connection": self.connection, "protection": self.protection, "how": self.how}


def is_loopback(host: str | None) -> bool:
    """localhost, 127.0.0.0/8 or ::1 (a host name other than localhost may resolve anywhere)."""
    if not host:
        return False
    host = host.strip("[]")
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_transport(
    connection: str, url: str | None, secure_schemes: tuple[str, ...], *, default: str = "https"
) -> Transport:
    """A connection made to a URL: TLS when its scheme is one of `secure_schemes`; `url` None means the
    client's default (AWS SDKs: https)."""
    if url is None:
        return Transport(
            connection, TLS if default in secure_schemes else NONE, f"{default}:// (the client's default)"
        )
    parts = urlsplit(url)
    where = f"{parts.scheme}://{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    if parts.scheme in secure_schemes:
        return Transport(f"{connection} ({where})", TLS, f"{parts.scheme}://")
    if parts.scheme == "unix" or is_loopback(parts.hostname):
        return Transport(f"{connection} ({where})", LOCAL, f"{parts.scheme}:// on this host")
    return Transport(f"{connection} ({where})", NONE, f"{parts.scheme}:// (not encrypted)")
