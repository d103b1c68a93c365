"""The policy settings of a `redis` target: one Redis server, all its databases."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...errors import PolicyError
from ...settings import TargetSettings, fill_environment
from ...transport import Transport, url_transport


class RedisTarget(TargetSettings):
    kind: Literal["redis"]
    url: str = Field(description="redis://[user:password@]host:port (rediss:// for TLS); ${VAR} from the environment")
    data_dir: str | None = Field(None, description="the server's data directory, when this machine can read it: "
                                                  "its append-only files are backed up too")

    def resolved_url(self) -> str:
        return fill_environment(self.url, "url")

    def written_password(self) -> str:
        from urllib.parse import urlsplit

        return urlsplit(self.url).password or ""

    def endpoint(self) -> str | None:
        """host:port of the server; None when the URL's host or port is a ${VARIABLE}."""
        from urllib.parse import urlsplit

        netloc = urlsplit(self.url).netloc.rpartition("@")[2]
        if "${" in netloc or not netloc:
            return None
        return netloc if ":" in netloc.strip("[]").split("]")[-1] else f"{netloc}:6379"

    def transports(self, name: str) -> list[Transport]:
        try:
            url = self.resolved_url()
        except PolicyError:
            url = self.url
        return [url_transport(f"target {name}: Redis", url, ("rediss",))]
