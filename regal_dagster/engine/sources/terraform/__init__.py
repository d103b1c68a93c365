"""`terraform`: a Terraform state (a file, or the newest version in an S3 state bucket), with checks that
it parses and that its serial never goes backwards."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .target import TerraformTarget as TARGET

if TYPE_CHECKING:
    from ..base import Source

__all__ = ["TARGET", "load"]


def load() -> Source:
    from .source import TerraformSource

    return TerraformSource()
