"""The policy settings of a `config` target: an application-configuration git repository."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...settings import TargetSettings


class ConfigTarget(TargetSettings):
    kind: Literal["config"]
    repository: str = Field(description="path of the configuration's git repository")
    lock_files: list[str] = Field(default_factory=lambda: ["requirements.txt", "poetry.lock", "uv.lock"],
                                  description="dependency lock files (relative to the repository) kept with hashes")
