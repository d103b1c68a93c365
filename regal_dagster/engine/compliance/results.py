"""The result of a control, and of a framework."""

from __future__ import annotations

PASS, FAIL, NOT_TESTED = "PASS", "FAIL", "NOT TESTED"
OUT_OF_SCOPE = "OUT OF SCOPE"  # the period ends before the policy took effect: nothing was required of it
RESULTS = (PASS, FAIL, NOT_TESTED, OUT_OF_SCOPE)
