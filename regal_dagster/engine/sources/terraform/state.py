"""Terraform state: from a local state file or an S3 state bucket (the newest version).

The state is stored as it is, through the usual pipeline; its serial, lineage, Terraform version and
resource count go into the manifest. A state whose serial goes backwards between backups of the same
lineage means someone rolled the state back: the `serial_monotonic` check fails (ERROR).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import RegalError

STATE_OBJECT = "terraform.tfstate"
STATE_CONTENT = "Terraform state (JSON)"


def read_state(location: str, *, region: str | None = None, endpoint_url: str | None = None) -> bytes:
    """The state's bytes: a path, or s3://bucket/key (the newest version of the object)."""
    if location.startswith("s3://"):
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, _, key = location[5:].partition("/")
        try:
            s3 = boto3.client("s3", region_name=region, endpoint_url=endpoint_url)
            return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except (BotoCoreError, ClientError) as exc:
            raise RegalError(f"cannot read the Terraform state {location}: {type(exc).__name__}",
                             "check the bucket, key and credentials (the backup needs s3:GetObject)") from None
    try:
        return Path(location).expanduser().read_bytes()
    except OSError as exc:
        raise RegalError(f"cannot read the Terraform state {location}: {exc.strerror}",
                         "check the target's `state` path in the policy") from None


def state_facts(data: bytes) -> dict[str, Any]:
    """serial, lineage, versions and resource count; `parse_error` when the state is not valid JSON state."""
    try:
        state = json.loads(data)
        if not isinstance(state, dict) or "serial" not in state or "lineage" not in state:
            raise ValueError("no serial and lineage")
    except ValueError as exc:
        return {"parse_error": str(exc)[:200], "bytes": len(data)}
    resources = state.get("resources", [])
    return {"serial": int(state["serial"]), "lineage": str(state["lineage"]), "version": state.get("version"),
            "terraform_version": state.get("terraform_version"), "resources": len(resources),
            "instances": sum(len(r.get("instances", [])) for r in resources),
            "outputs": sorted(state.get("outputs", {})), "bytes": len(data)}
