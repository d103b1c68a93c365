"""Regal Backup as an OSCAL component definition (OSCAL 1.1): how it implements the NIST SP 800-53 rev. 5
controls its NIST framework module cites (CP-9 and enhancements, CP-10, CP-4, AU-9, AU-10, SC-12/13/28), each
implemented requirement naming our controls (BK-01, ...) that evidence it, against NIST's own OSCAL catalogue.

The other frameworks have no official OSCAL catalogue: each is one more control implementation whose source is
a URN naming the framework (`urn:regal-backup:framework:<id>`), its requirements by identifier only (a control-id
made an OSCAL token from it, the identifier as printed in a `framework-identifier` property), each naming our
controls that meet it, as the report's requirements section does. Their texts are not ours to copy.
Identifiers are UUIDv5 of the version and the control: the same version gives the same document."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Any

from .controls import CONTROLS
from .frameworks.registry import frameworks
from .oscal import NAMESPACE, OSCAL_VERSION

NIST_CATALOG = ("https://raw.githubusercontent.com/usnistgov/oscal-content/main/nist.gov/SP800-53/rev5/json/"
                "NIST_SP-800-53_rev5_catalog.json")
FILE = "component-definition.json"


def oscal_control_id(identifier: str) -> str:
    """NIST's printed identifier as its OSCAL catalogue spells it: CP-9(1) -> cp-9.1, SC-28 -> sc-28."""
    m = re.fullmatch(r"([A-Z]{2})-(\d+)(?:\((\d+)\))?", identifier)
    if not m:
        raise ValueError(f"not an 800-53 control identifier: {identifier}")
    return f"{m[1].lower()}-{m[2]}" + (f".{m[3]}" if m[3] else "")


def token_of(key: str, identifier: str) -> str:
    """A framework's requirement identifier as an OSCAL token: `soc2-a1.2`, `hipaa-164.308-a-7-ii-a`,
    `dora-art-12-3`, `nis2-eu-2024-2690-4.2.2`."""
    return f"{key}-" + re.sub(r"[^a-z0-9.]+", "-", identifier.lower()).strip("-")


def component_definition(version: str, generated_at: datetime) -> dict[str, Any]:
    root = uuid.uuid5(uuid.NAMESPACE_URL, f"urn:regal-backup:component-definition:{version}")

    def uid(*names: str) -> str:
        return str(uuid.uuid5(root, "/".join(names)))

    specs = {spec.control_id: spec for spec, _ in CONTROLS}
    nist = frameworks(["nist80053"])["nist80053"]
    implemented = []
    for identifier, ours in nist.requirements.items():
        implemented.append({
            "uuid": uid("requirement", identifier),
            "control-id": oscal_control_id(identifier),
            "description": " ".join(f"{c}: {specs[c].description}" for c in ours),
            "props": [{"name": "regal-control", "ns": NAMESPACE, "value": c} for c in ours],
            "remarks": "Evidenced each period by the compliance report's test of "
                       + ", ".join(f"{c} ({specs[c].test})" for c in ours),
        })
    implementations = [{
        "uuid": uid("implementation", "nist80053"),
        "source": NIST_CATALOG,
        "description": f"{nist.name}: the controls of Regal Backup that implement each.",
        "implemented-requirements": implemented,
    }]
    for key, framework in frameworks().items():
        if key == "nist80053":
            continue
        implementations.append({
            "uuid": uid("implementation", key),
            "source": f"urn:regal-backup:framework:{key}",
            "description": f"{framework.name}, by requirement identifier only (no official OSCAL catalogue): the "
                           "controls of Regal Backup that meet each.",
            "implemented-requirements": [{
                "uuid": uid("requirement", key, identifier),
                "control-id": token_of(key, identifier),
                "description": " ".join(f"{c}: {specs[c].description}" for c in ours)
                               or framework.untested.get(identifier, "no control of Regal Backup evidences it"),
                "props": [{"name": "framework-identifier", "ns": NAMESPACE,
                           "value": f"{framework.citation} {identifier}"},
                          *({"name": "regal-control", "ns": NAMESPACE, "value": c} for c in ours)],
            } for identifier, ours in framework.requirements.items()],
        })
    document = {
        "uuid": uid("component-definition"),
        "metadata": {"title": "Regal Backup: backup, restore and audit controls", "last-modified":
                     generated_at.isoformat(), "version": version, "oscal-version": OSCAL_VERSION},
        "components": [{
            "uuid": uid("component"),
            "type": "software",
            "title": "Regal Backup",
            "description": "Backs up, verifies, restore-tests and reports on PostgreSQL, Redis, Terraform state and "
                           "configuration: encrypted (Tink streaming AEAD), copied off-site, every operation a "
                           "hash-chained audit event.",
            "purpose": "Information system backup and recovery",
            "control-implementations": implementations,
        }],
    }
    return {"component-definition": document}
