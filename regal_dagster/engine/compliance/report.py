"""The compliance report: a PDF an auditor reads on its own, every figure traceable to evidence.

`build_report(policy, period)` gathers the evidence of a period (a month `2026-11` or a quarter
`2026-Q4`; a future one is refused, the current one is marked interim): the audit trail's events (the
source of every count and rate), the chain's verification, the prune logs the trail vouches for
(retention at the period's end), the key inventory, the connections' encryption as configured, the
policy (`evidence`). It judges each control on that evidence alone (`controls`), derives the frameworks'
verdicts (each framework's module in `frameworks/` says which controls meet its requirements and how they
decide its verdict: by default it passes only when every control mapped to it passes) and one list of
exceptions (each failed or untested control, with its owner, action and due date from the policy). It
renders the HTML templates in `reports/` (shipped as the package `regal_dagster.reports`) with WeasyPrint
(fetching nothing but those templates' own files) into a PDF/A-3b with the evidence attached
(`evidence.json`, whose SHA-256 is on the cover, and one CSV per table) and the results as OSCAL
Assessment Results JSON, stores both in the repository (`compliance-reports/<period>/`) with their
SHA-256 beside them, and records the generation in the audit trail. Every string from the outside world
goes through the template engine's escaping.
"""

from __future__ import annotations

import hashlib
import secrets
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ... import __version__
from ..audit import AuditTrail, record, verify_trail
from ..layout import report_key, report_oscal_key
from ..policy import Policy
from ..storage import Repository, open_repository
from . import oscal
from .component import FILE as COMPONENT_FILE
from .component import component_definition
from .controls import Control, Facts, evaluate_controls, exceptions, framework_verdicts, requirement_results
from .evidence import Period, collect_evidence, figures, operational_failures, policy_facts
from .frameworks.registry import frameworks as frameworks_in
from .listings import WHOLE, listings
from .rendering import EVIDENCE_FILE, OSCAL_FILE, charts, render_pdf, sign_pdf, signer_of
from .results import FAIL, NOT_TESTED, OUT_OF_SCOPE, PASS

__all__ = ["Period", "ReportResult", "build_report"]


@dataclass
class ReportResult:
    report_id: str
    period: str
    key: str  # repository key of the PDF
    sha256: str
    pdf: bytes
    evidence_sha256: str
    chain_ok: bool
    controls: list[Control]
    figures: dict[str, Any]
    refused_urls: list[str]
    frameworks: dict[str, str] = field(default_factory=dict)
    exceptions: list[dict[str, Any]] = field(default_factory=list)
    interim: bool = False
    oscal_key: str = ""  # repository key of the OSCAL Assessment Results
    oscal: bytes = b""


def assessment_results(
    report_id: str,
    period: Period,
    now: datetime,
    interim: bool,
    evidence_sha256: str,
    frameworks: dict[str, str],
    controls: list[Control],
    found: list[dict[str, Any]],
) -> bytes:
    by_control = {e["control_id"]: e for e in found}
    document = oscal.assessment_results(
        report_id=report_id,
        period=period.label,
        start=period.start,
        end=period.judged_at(now),
        generated_at=now,
        interim=interim,
        evidence_sha256=evidence_sha256,
        evidence_name=EVIDENCE_FILE,
        frameworks=frameworks,
        controls=[
            oscal.AssessedControl(
                c.control_id,
                c.description,
                c.test,
                c.finding,
                c.result,
                tuple(c.mapping),
                c.evidence,
                by_control.get(c.control_id),
            )
            for c in controls
        ],
    )
    return oscal.to_bytes(document)


def build_report(
    policy: Policy,
    period: Period,
    *,
    repo: Repository | None = None,
    trigger: dict[str, str] | None = None,
    now: datetime | None = None,
    scope: list[str] | None = None,
) -> ReportResult:
    """`scope`: the ids of the frameworks reported on (default: the policy's reports.frameworks); an unknown
    one is refused (exit 2) before anything is read."""
    now = now or datetime.now(UTC)
    period.refuse_future(now)
    scope = list(dict.fromkeys(scope or policy.reports.frameworks))
    in_scope = frameworks_in(scope)  # refuses an unknown id, naming the known ones
    repo = repo or open_repository(policy)
    trail = AuditTrail(policy, repo)
    trail.ensure_schema()
    trail_events = trail.events()  # read once: verified whole, then the period's share is the evidence
    # Resumed from an authentic checkpoint older than the period, so that every entry of the period is recomputed.
    verdict = verify_trail(trail, trail_events, resume_before=period.start)
    trail.checkpoint(verdict)
    evidence = collect_evidence(policy, repo, trail_events, period, verdict, now)
    figs = figures(policy, evidence, period, now)
    failures = operational_failures(evidence)
    matrix = evaluate_controls(Facts(policy, evidence, figs, failures, verdict, period, now), scope)
    frameworks = framework_verdicts(matrix, scope)
    requirements = requirement_results(matrix, scope)
    found = exceptions(policy, matrix, period, now)
    interim = period.interim(now)
    report_id = f"{period.label}-{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    evidence_json = evidence.json_bytes()
    evidence_sha = hashlib.sha256(evidence_json).hexdigest()
    csvs = {f"{name}.csv": evidence.csv(name).encode() for name in evidence.tables}
    results = assessment_results(report_id, period, now, interim, evidence_sha, frameworks, matrix, found)
    component = oscal.to_bytes(component_definition(__version__, now))
    context = {
        "report_id": report_id,
        "period": period,
        "generated_at": now,
        "judged_at": period.judged_at(now),
        "interim": interim,
        "evidence_sha256": evidence_sha,
        "verdict": verdict,
        "policy": policy,
        "facts": policy_facts(policy),
        "figures": figs,
        "frameworks": frameworks,
        "in_scope": in_scope,
        "requirements": requirements,
        "controls": matrix,
        "exceptions": found,
        "failures": failures,
        "evidence": evidence,
        "listed": listings(evidence.tables, sorted(policy.targets)),
        "whole_rows": WHOLE,
        "target_kinds": dict(Counter(t.kind for t in policy.targets.values()).most_common()),
        "charts": charts(policy, evidence, period, now),
        "attachments": {
            name: (hashlib.sha256(body).hexdigest(), len(evidence.tables[name.removesuffix(".csv")]))
            for name, body in csvs.items()
        },
        "oscal_file": OSCAL_FILE,
        "component_file": COMPONENT_FILE,
        "component_sha256": hashlib.sha256(component).hexdigest(),
        "signer": signer_of(policy),
        "oscal_sha256": hashlib.sha256(results).hexdigest(),
        "evidence_file": EVIDENCE_FILE,
        "PASS": PASS,
        "FAIL": FAIL,
        "NOT_TESTED": NOT_TESTED,
        "OUT_OF_SCOPE": OUT_OF_SCOPE,
    }
    pdf, refused = render_pdf(context, {EVIDENCE_FILE: evidence_json, OSCAL_FILE: results,
                                        COMPONENT_FILE: component, **csvs})
    if policy.reports.signing is not None:
        pdf = sign_pdf(policy, pdf, report_id)
    digest = hashlib.sha256(pdf).hexdigest()
    key, results_key = report_key(period.label, report_id), report_oscal_key(period.label, report_id)
    repo.put_bytes(results_key, results)
    repo.put_bytes(key, pdf)
    repo.put_bytes(
        key + ".sha256",
        f"{digest}  {key.rsplit('/', 1)[1]}\n{hashlib.sha256(results).hexdigest()}  "
        f"{results_key.rsplit('/', 1)[1]}\n".encode(),
    )
    record(
        policy,
        repo,
        "report_generated",
        key,
        "success",
        {
            "period": period.label,
            "interim": interim,
            "sha256": digest,
            "evidence_sha256": evidence_sha,
            "oscal": results_key,
            "chain_ok": verdict.ok,
            "frameworks": frameworks,
            "exceptions": len(found),
        },
        trigger,
    )
    return ReportResult(
        report_id,
        period.label,
        key,
        digest,
        pdf,
        evidence_sha,
        verdict.ok,
        matrix,
        figs,
        refused,
        frameworks,
        found,
        interim,
        results_key,
        results,
    )
