"""The report as people read it: the charts, the HTML templates in `reports/` (shipped as the package
`regal_dagster.reports`) rendered by WeasyPrint (fetching nothing but those templates' own files) into a
PDF/A-3b with the evidence attached, and its PAdES signature."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.resources import files
from itertools import pairwise
from pathlib import Path
from statistics import median
from typing import Any

from ..errors import RegalError
from ..policy import Policy
from .charts import PALETTE, human_seconds, line_chart
from .evidence import Evidence, Period, row_at


def _template_directory() -> Path:
    """The templates' directory, the package `regal_dagster.reports`: the repository's top-level `reports/`
    in an editable install, `site-packages/regal_dagster/reports/` from the wheel."""
    directory = files("regal_dagster.reports")
    return directory.resolve() if isinstance(directory, Path) else Path(str(directory))


TEMPLATES = _template_directory()
EVIDENCE_FILE = "evidence.json"
OSCAL_FILE = "assessment-results.json"


# --- charts --------------------------------------------------------------------------------------------


def charts(policy: Policy, evidence: Evidence, period: Period, now: datetime) -> dict[str, str]:
    t = evidence.tables
    start, end = period.start, period.judged_at(now)
    since = (t.get("operation") or [{}])[0].get("in_operation_since")
    if since and start < datetime.fromisoformat(since) < end:  # the axis starts when the system did: a short
        start = datetime.fromisoformat(since).replace(second=0, microsecond=0)  # history stays readable
    ok = [r for r in t["backups"] if r["outcome"] == "success"]

    def per_target(
        rows: list[dict[str, Any]], value: Callable[[dict[str, Any]], float | None]
    ) -> dict[str, list[tuple[datetime, float]]]:
        series: dict[str, list[tuple[datetime, float]]] = {}
        for r in rows:
            if (v := value(r)) is not None:
                series.setdefault(r["target"], []).append((row_at(r), float(v)))
        return fleet(series)

    before = {r["target"]: row_at(r) for r in t["backups_before_period"]}
    gaps: dict[str, list[tuple[datetime, float]]] = {}
    ok_times: dict[str, list[datetime]] = {}
    for r in ok:
        ok_times.setdefault(r["target"], []).append(row_at(r))
    for target in sorted(policy.targets):
        times = sorted(ok_times.get(target, []))
        times = [before[target], *times] if target in before else times
        if times:
            gaps[target] = [(b, (b - a).total_seconds()) for a, b in pairwise(times)]
    return {
        "size": line_chart(
            per_target(ok, lambda r: r.get("bytes_stored")),
            "Backup size (stored, compressed and encrypted)",
            "size",
            start,
            end,
        ),
        "duration": line_chart(
            per_target(ok, lambda r: r.get("seconds")), "Backup duration", "duration", start, end
        ),
        "rpo": line_chart(
            fleet({k: v for k, v in gaps.items() if v}),
            "Time between successful backups (achieved RPO)",
            "duration",
            start,
            end,
            target=policy.rpo.total_seconds(),
            target_label="RPO objective",
        ),
        "rto": line_chart(
            per_target(t["restore_tests"], lambda r: r.get("rto_seconds")),
            "Restore tests: time to restore (RTO)",
            "duration",
            start,
            end,
            target=policy.rto.total_seconds(),
            target_label="RTO objective",
        ),
    }


def fleet(series: dict[str, list[tuple[datetime, float]]]) -> dict[str, list[tuple[datetime, float]]]:
    """One line per target while the lines can be told apart (as many as the palette has colours); beyond that,
    per day (plotted at noon UTC), the highest and the median value over the targets: the chart of a fleet
    stays readable, and every value is in the attached CSVs."""
    if len(series) <= len(PALETTE):
        return series
    days: dict[datetime, list[float]] = {}
    for values in series.values():
        for when, value in values:
            days.setdefault(when.replace(hour=12, minute=0, second=0, microsecond=0), []).append(value)
    return {f"highest of {len(series)} targets": [(day, max(v)) for day, v in sorted(days.items())],
            f"median of {len(series)} targets": [(day, median(v)) for day, v in sorted(days.items())]}


# --- rendering -----------------------------------------------------------------------------------------


def _fetcher():
    """WeasyPrint fetches only the templates' own files: anything else (http, other paths) is refused."""
    from weasyprint import URLFetcher

    class LocalTemplatesOnly(URLFetcher):
        def __init__(self) -> None:
            super().__init__()
            self.refused: list[str] = []

        def fetch(self, url, headers=None):
            if url.startswith("file://"):
                path = Path(url.removeprefix("file://").split("?")[0]).resolve()
                if TEMPLATES.resolve() in path.parents:
                    return super().fetch(url, headers)
            self.refused.append(url)
            raise ValueError(f"the report renderer fetches only its own template files, not {url[:80]}")

    return LocalTemplatesOnly()


def _breakable(value: Any, shortest: int = 18) -> Any:
    """Text whose tokens of `shortest` characters or more (identifiers, paths, DSNs) may wrap after their
    separators (- _ / : . ,); words, dates and shorter tokens stay whole. Text between backticks is a
    command, set in code type."""
    from markupsafe import Markup, escape

    def token(text: str) -> Markup:
        if len(text) < shortest:
            return escape(text)
        return Markup("<wbr>").join(escape(part) for part in re.split(r"(?<=[-_/:.,])", text))

    def words(text: str) -> Markup:
        return Markup("").join(token(part) for part in re.split(r"(\s+)", text))

    parts = str(value).split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: plain text
        return words(str(value))
    return Markup("").join(words(part) if i % 2 == 0 else Markup("<code>") + words(part) + Markup("</code>")
                           for i, part in enumerate(parts))


def _when(value: Any) -> str:
    """A timestamp for a table: UTC to the minute."""
    if value in (None, ""):
        return ""
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M}"


def _words(value: Any) -> str:
    """An identifier as words (policy_change -> policy change)."""
    return str(value).replace("_", " ")


def _counts(value: dict[str, Any] | None) -> str:
    """Per-table counts for people: `public.customers 2, public.orders 1`, or `none`."""
    items = [f"{k} {v}" for k, v in (value or {}).items() if v]
    return ", ".join(items) or "none"


def render_pdf(context: dict[str, Any], attachments: dict[str, bytes]) -> tuple[bytes, list[str]]:
    """The PDF (PDF/A-3b, attachments embedded) and the URLs the renderer refused to fetch."""
    import jinja2
    from weasyprint import HTML, Attachment

    if not (TEMPLATES / "compliance_report.html").is_file():
        raise RegalError(f"the report templates are missing from {TEMPLATES}",
                         "reinstall regal-backup from its wheel or the source tree (not from a zip archive)")
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined
    )
    environment.filters.update(
        duration=human_seconds, breakable=_breakable, when=_when, words=_words, counts=_counts
    )
    html = environment.get_template("compliance_report.html").render(**context)
    fetcher = _fetcher()
    described = {
        EVIDENCE_FILE: "all evidence as JSON (its SHA-256 is on the cover)",
        OSCAL_FILE: "the results as OSCAL Assessment Results",
        "component-definition.json": "Regal Backup as an OSCAL component definition (NIST SP 800-53 rev. 5)",
    }
    files = [
        Attachment(
            string=body,
            name=name,
            relationship="Data",
            description=described.get(name, f"evidence: {name.removesuffix('.csv')}"),
        )
        for name, body in attachments.items()
    ]
    pdf = HTML(string=html, base_url=TEMPLATES.as_uri() + "/", url_fetcher=fetcher).write_pdf(
        pdf_variant="pdf/a-3b", attachments=files, custom_metadata=True
    )
    return pdf, list(fetcher.refused)


def signer_of(policy: Policy) -> str | None:
    """Who signs the report (the subject of reports.signing's certificate), None: it is not signed."""
    signing = policy.reports.signing
    if signing is None:
        return None
    from cryptography import x509

    try:
        certificate = x509.load_pem_x509_certificate(policy.resolve_path(signing.cert_file).read_bytes())
    except (OSError, ValueError):
        return "the certificate reports.signing names (it cannot be read: the signing will say why)"
    return certificate.subject.rfc4514_string()


def sign_pdf(policy: Policy, pdf: bytes, report_id: str) -> bytes:
    """A PAdES signature over the whole PDF (an incremental update: the PDF/A content stays as it is)."""
    import os

    from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
    from pyhanko.sign import signers

    signing = policy.reports.signing
    assert signing is not None
    passphrase = os.environ.get(signing.passphrase_env, "").encode() if signing.passphrase_env else None
    try:
        signer = signers.SimpleSigner.load(
            str(policy.resolve_path(signing.key_file)),
            str(policy.resolve_path(signing.cert_file)),
            ca_chain_files=[str(policy.resolve_path(f)) for f in signing.chain_files],
            key_passphrase=passphrase,
        )
    except (OSError, ValueError) as exc:
        raise RegalError(
            f"the report signing key or certificate cannot be loaded ({type(exc).__name__})",
            "check reports.signing: the files, and the passphrase variable",
        ) from None
    if signer is None:
        raise RegalError(
            "the report signing key or certificate cannot be loaded",
            "check reports.signing: the files, and the passphrase variable",
        )
    out = signers.sign_pdf(
        IncrementalPdfFileWriter(io.BytesIO(pdf)),
        signers.PdfSignatureMetadata(
            field_name="RegalBackupReport", reason="compliance report", name=report_id, md_algorithm="sha256"
        ),
        signer=signer,
    )
    return out.getvalue()
