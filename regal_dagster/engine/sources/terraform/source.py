"""The `terraform` source kind."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, cast

from ...crypto import Keyring
from ...errors import IntegrityError
from ...findings import Finding, finding
from ...manifest import Manifest
from ...outcomes import ERROR, CheckOutcome, CheckSpec
from ...pipeline import StoredBackup
from ...settings import PolicyView, TargetSettings
from ...workspace import private_directory
from ..base import (
    Captured,
    Restored,
    RestoredFindings,
    RestoreRequest,
    Source,
    StoreObject,
    not_empty_refusal,
)
from .state import STATE_CONTENT, STATE_OBJECT, read_state, state_facts
from .target import TerraformTarget

COMPARED = ("serial", "lineage", "resources", "parse_error")


class TerraformSource(Source):
    kind = "terraform"
    label = "Terraform state"
    checks: ClassVar[dict[str, CheckSpec]] = {
        "state_valid": CheckSpec(ERROR, True, "The Terraform state parses and has a serial and a lineage."),
        "serial_monotonic": CheckSpec(
            ERROR, True, "The state's serial never goes backwards between backups of the same lineage (a "
                         "backwards serial means the state was rolled back)."),
    }
    restore_test_proves = "the state's serial, lineage and resource count"

    def capture(self, target: TargetSettings, store: StoreObject) -> Captured:
        settings = cast(TerraformTarget, target)
        data = read_state(settings.state, region=settings.region, endpoint_url=settings.endpoint_url)
        record = store(STATE_OBJECT, STATE_CONTENT, [data], 0)
        return Captured([record], {"location": settings.state, "state": state_facts(data)})

    def preflight(self, subject: str, target: TargetSettings) -> list[Finding]:
        settings = cast(TerraformTarget, target)

        def readable() -> str:
            facts = state_facts(read_state(settings.state, region=settings.region, endpoint_url=settings.endpoint_url))
            return f"{settings.state}: serial {facts.get('serial')}"

        return [finding(subject, "state", readable, "fix state: in the policy, or the credentials of its bucket")]

    def check_structure(self, backup: StoredBackup) -> str:
        facts = state_facts(backup.read(STATE_OBJECT))
        recorded = backup.manifest.source["state"].get("serial")
        if facts.get("serial") != recorded:
            raise IntegrityError(f"the stored state has serial {facts.get('serial')}, the manifest says {recorded}",
                                 "this backup is damaged: use another one")
        return f"the state reads back with serial {facts.get('serial')}"

    def kind_checks(self, policy: PolicyView, target: str, manifest: Manifest,
                    earlier_good: Iterator[Manifest], trigger: Mapping[str, str]) -> list[CheckOutcome]:
        """state_valid, and serial_monotonic against every earlier good backup of the same lineage."""
        state = manifest.source["state"]
        if "parse_error" in state:
            return [CheckOutcome("state_valid", False, f"the state does not parse: {state['parse_error']}"),
                    CheckOutcome("serial_monotonic", False, "not run: the state does not parse")]
        valid = CheckOutcome("state_valid", True, f"serial {state['serial']}, lineage {state['lineage']}, "
                             f"{state['resources']} resources, Terraform {state['terraform_version']}",
                             metadata={"serial": state["serial"], "resources": state["resources"]})
        earlier = list(earlier_good)
        same_lineage = [m.source["state"] for m in earlier
                        if m.source.get("state", {}).get("lineage") == state["lineage"]]
        highest = max((s["serial"] for s in same_lineage), default=None)
        if highest is not None and state["serial"] < highest:
            return [valid, CheckOutcome("serial_monotonic", False, f"serial {state['serial']} is lower than {highest} "
                                        "in an earlier backup: the state was rolled back; find out who and why before "
                                        "the next apply", metadata={"serial": state["serial"], "earlier": highest})]
        note = "first backup of this lineage" if highest is None else f"up from {highest}"
        if not same_lineage and earlier:
            note = "a new lineage: the state was replaced, not rolled back"
        return [valid, CheckOutcome("serial_monotonic", True, f"serial {state['serial']} ({note})",
                                    metadata={"serial": state["serial"]})]

    def summary(self, manifest: Manifest) -> dict[str, Any]:
        state = manifest.source.get("state", {})
        return {"serial": state.get("serial"), "resources": state.get("resources")}

    def restore(self, backup: StoredBackup, request: RestoreRequest) -> Restored:
        started = time.monotonic()
        path = Path(request.to)
        if path.exists() and not request.drop_existing:
            raise not_empty_refusal(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if request.before_writing:
            request.before_writing()
        backup.install(STATE_OBJECT, path)
        state = backup.manifest.source["state"]
        return Restored(str(path), f"restored {backup.manifest.backup_id} to {path} (serial {state.get('serial')}, "
                                   f"lineage {state.get('lineage')}, {state.get('resources')} resources)",
                        seconds={"fetch_decrypt": time.monotonic() - started}, details={"path": str(path)},
                        next_steps=f"Review it, then: terraform state push {path}  (add -force only if the remote "
                                   "serial is higher and you mean to roll back)")

    @contextlib.contextmanager
    def scratch_destination(self, work_dir: Path | None, manifest: Manifest | None = None) -> Iterator[str]:
        with private_directory("terraform-test", work_dir) as tmp:
            yield str(Path(tmp) / STATE_OBJECT)

    def verify_restored(self, destination: str, manifest: Manifest, keyring: Keyring, jobs: int) -> RestoredFindings:
        """The restored state parsed: serial, lineage and resource count as recorded."""
        facts = state_facts(Path(destination).read_bytes())
        expected = manifest.source["state"]
        return RestoredFindings([f"the restored state has {key} {facts.get(key)!r}, the backup recorded "
                                 f"{expected.get(key)!r}" for key in COMPARED if facts.get(key) != expected.get(key)],
                                facts)
