"""The policy settings of a `files` target: files and directories kept outside git (TLS certificates,
application configuration on the hosts)."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Literal

from pydantic import Field, field_validator

from ...settings import TargetSettings


class FilesTarget(TargetSettings):
    kind: Literal["files"]
    paths: list[str] = Field(min_length=1, description="absolute paths of files or directories (directories "
                             "with everything below them)")
    exclude: list[str] = Field(default_factory=list, description="glob patterns of paths to leave out, matched "
                               "against each absolute path (e.g. '*.tmp', '/etc/regal/cache/*')")

    @field_validator("paths")
    @classmethod
    def _absolute(cls, paths: list[str]) -> list[str]:
        for path in paths:
            if not PurePosixPath(path).is_absolute():
                raise ValueError(f"'{path}' is not an absolute path: write it from / (a restore puts each path "
                                 "back under the directory it is given)")
        return paths
