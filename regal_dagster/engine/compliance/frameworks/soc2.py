"""SOC 2, the AICPA Trust Services Criteria (2017, points of focus revised 2022): availability (A1.2, A1.3) and
the system operations criteria on incidents (CC7.4, CC7.5). Cited by identifier only."""

from .base import Framework

FRAMEWORK = Framework(
    name="SOC 2 (TSC 2017, rev. 2022)",
    citation="SOC 2",
    position=40,
    requirements={
        "A1.2": ("BK-01", "BK-02", "VR-01", "MD-01"),  # backup processes and recovery infrastructure
        "A1.3": ("RT-01", "DR-01", "VR-01", "SO-01"),  # recovery plan tested; backup data complete and intact
        "CC7.4": ("AL-01", "DR-01"),  # incidents responded to
        "CC7.5": ("RT-01", "DR-01"),  # operations restored after an incident
    },
)
