"""The policy settings of a `redis` target: one Redis server, all its databases."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...settings import TargetSettings, fill_environment


class RedisTarget(TargetSettings):
    kind: Literal["redis"]
    url: str = Field(description="redis://[user:password@]host:port (rediss:// for TLS); ${VAR} from the environment")
    data_dir: str | None = Field(None, description="the server's data directory, when this machine can read it: "
                                                  "its append-only files are backed up too")

    def resolved_url(self) -> str:
        return fill_environment(self.url, "url")
