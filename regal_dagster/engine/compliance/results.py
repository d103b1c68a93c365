"""The result of a control, and of a framework."""

from __future__ import annotations

PASS, FAIL, NOT_TESTED = "PASS", "FAIL", "NOT TESTED"
RESULTS = (PASS, FAIL, NOT_TESTED)
