"""The policy settings of a `terraform` target: one state, in a file or an S3 state bucket."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...settings import TargetSettings
from ...transport import Transport, url_transport


class TerraformTarget(TargetSettings):
    kind: Literal["terraform"]
    state: str = Field(description="path of a terraform.tfstate, or s3://bucket/key of a state bucket")
    region: str | None = None
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint of the state bucket")

    def endpoint(self) -> str | None:
        """A state file: this machine (`local`); a state bucket: its endpoint's host, or `s3`."""
        if not self.state.startswith("s3://"):
            return "local"
        if not self.endpoint_url:
            return "s3"
        from urllib.parse import urlsplit

        netloc = urlsplit(self.endpoint_url).netloc
        return None if "${" in netloc or not netloc else netloc

    def transports(self, name: str) -> list[Transport]:
        if not self.state.startswith("s3://"):
            return []  # a state file on this machine
        return [url_transport(f"target {name}: S3 state bucket", self.endpoint_url, ("https",))]
