"""The report's results as an OSCAL Assessment Results document (NIST OSCAL 1.1), for auditors' tools.

One result for the period: the controls reviewed, one observation per control (what was tested, what was
found, which evidence), one finding per control (satisfied, or not satisfied with the reason `fail`, or
`other` when it could not be tested), each exception's owner, action and due date, and the evidence file
in the back matter with its SHA-256. Every identifier is a UUIDv5 derived from the evidence's SHA-256:
the same evidence gives the same document identifiers, whoever builds it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

OSCAL_VERSION = "1.1.3"
NAMESPACE = "urn:regal-backup:oscal"


@dataclass(frozen=True)
class AssessedControl:
    control_id: str
    title: str  # what the control asks
    test: str  # how it was tested
    finding: str  # what was found
    result: str  # PASS | FAIL | NOT TESTED
    mapping: tuple[str, ...]  # framework requirements
    evidence: str  # evidence tables
    exception: dict[str, str] | None = None  # owner, action, due


def identifiers(evidence_sha256: str) -> uuid.UUID:
    """The namespace every identifier of the document is derived from."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"urn:regal-backup:evidence:{evidence_sha256}")


def _prop(name: str, value: str, remarks: str | None = None) -> dict[str, str]:
    body = {"name": name, "ns": NAMESPACE, "value": " ".join(value.split()) or "-"}
    return {**body, "remarks": remarks} if remarks else body


def assessment_results(
    *,
    report_id: str,
    period: str,
    start: datetime,
    end: datetime,
    generated_at: datetime,
    interim: bool,
    evidence_sha256: str,
    evidence_name: str,
    frameworks: dict[str, str],
    controls: Sequence[AssessedControl],
) -> dict[str, Any]:
    root = identifiers(evidence_sha256)

    def uid(*names: str) -> str:
        return str(uuid.uuid5(root, "/".join(names)))

    evidence_ref = f"#{uid('resource', 'evidence')}"
    observations, findings = [], []
    for c in controls:
        observations.append(
            {
                "uuid": uid("observation", c.control_id),
                "title": f"{c.control_id}: test performed",
                "description": c.test,
                "methods": ["TEST"],
                "types": ["control-objective"],
                "props": [_prop("result", c.result)],
                "collected": generated_at.isoformat(),
                "relevant-evidence": [
                    {"href": evidence_ref, "description": f"evidence tables: {c.evidence}"}
                ],
                "remarks": c.finding,
            }
        )
        state = "satisfied" if c.result == "PASS" else "not-satisfied"
        reason = {"PASS": "pass", "FAIL": "fail"}.get(c.result, "other")
        finding: dict[str, Any] = {
            "uuid": uid("finding", c.control_id),
            "title": f"{c.control_id}: {c.result}",
            "description": c.title,
            "props": [_prop("result", c.result)] + [_prop("mapping", m) for m in c.mapping],
            "target": {
                "type": "objective-id",
                "target-id": f"{c.control_id}_obj",
                "title": c.title,
                "status": {"state": state, "reason": reason, "remarks": c.finding},
            },
            "related-observations": [{"observation-uuid": uid("observation", c.control_id)}],
        }
        if c.exception:
            finding["props"] += [
                _prop("exception-owner", c.exception["owner"]),
                _prop("exception-due", c.exception["due"]),
            ]
            finding["remarks"] = f"Action: {c.exception['action']}"
        findings.append(finding)
    document = {
        "uuid": uid("assessment-results"),
        "metadata": {
            "title": f"Regal Backup compliance report {period}" + (" (interim)" if interim else ""),
            "last-modified": generated_at.isoformat(),
            "version": report_id,
            "oscal-version": OSCAL_VERSION,
            "props": [
                _prop("period", period),
                _prop("evidence-sha256", evidence_sha256),
                _prop("interim", "true" if interim else "false"),
            ],
            "roles": [{"id": "assessor", "title": "Automated assessor (Regal Backup)"}],
        },
        "import-ap": {
            "href": f"#{uid('resource', 'assessment-plan')}",
            "remarks": "The assessment plan is the control matrix of the report: each control's test.",
        },
        "results": [
            {
                "uuid": uid("result"),
                "title": f"Backup and recovery controls, {period}",
                "description": "Controls of backup, recovery, encryption, retention and the audit trail, "
                "tested on the period's audit trail, repository and policy.",
                "start": start.isoformat(),
                "end": end.isoformat(),
                "props": [
                    _prop("framework-result", verdict, framework) for framework, verdict in frameworks.items()
                ],
                "reviewed-controls": {
                    "control-selections": [
                        {"include-controls": [{"control-id": c.control_id} for c in controls]}
                    ]
                },
                "observations": observations,
                "findings": findings,
            }
        ],
        "back-matter": {
            "resources": [
                {
                    "uuid": uid("resource", "evidence"),
                    "title": evidence_name,
                    "description": "Every row behind every figure of the report, attached to the PDF.",
                    "rlinks": [
                        {
                            "href": evidence_name,
                            "media-type": "application/json",
                            "hashes": [{"algorithm": "SHA-256", "value": evidence_sha256}],
                        }
                    ],
                },
                {
                    "uuid": uid("resource", "assessment-plan"),
                    "title": "Assessment plan: the report's control matrix",
                    "description": "Each control's description, frequency and test, as printed in the PDF "
                    f"report {report_id}.",
                },
            ]
        },
    }
    return {"assessment-results": document}


def to_bytes(document: dict[str, Any]) -> bytes:
    return (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode()
