"""The HIPAA Security Rule (45 CFR Part 164): the contingency plan's implementation specifications
164.308(a)(7)(ii)(A)-(E) and audit controls 164.312(b). Cited by identifier only."""

from .base import Framework

FRAMEWORK = Framework(
    name="HIPAA Security Rule",
    citation="HIPAA",
    position=60,
    requirements={
        # retrievable exact copies: restore tests compare per-table row counts and content digests
        "164.308(a)(7)(ii)(A)": ("BK-01", "VR-01", "RT-01"),
        "164.308(a)(7)(ii)(B)": ("DR-01",),  # disaster recovery: the plan rehearsed by the drill
        "164.308(a)(7)(ii)(C)": (),  # emergency mode operation: an organisational plan
        "164.308(a)(7)(ii)(D)": ("RT-01", "DR-01", "SO-01"),  # testing and revision
        "164.308(a)(7)(ii)(E)": ("TI-01",),  # criticality analysis: a tier per target, met
        "164.312(b)": ("AU-01", "AU-02"),  # audit controls
    },
    untested={
        "164.308(a)(7)(ii)(C)": "an emergency mode operation plan is the organisation's: Regal Backup records "
                                "no evidence of it",
    },
)
