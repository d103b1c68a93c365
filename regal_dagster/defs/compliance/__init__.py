"""Compliance in Dagster: the `compliance/report` asset (monthly, after every drill, on demand)."""

from .report import REPORT_JOB, REPORT_KEY, compliance_definitions

__all__ = ["REPORT_JOB", "REPORT_KEY", "compliance_definitions"]
