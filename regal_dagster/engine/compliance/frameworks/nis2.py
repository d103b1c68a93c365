"""NIS2: Commission Implementing Regulation (EU) 2024/2690, Annex section 4.2 (backup and redundancy
management). Cited by identifier only."""

from .base import Framework

FRAMEWORK = Framework(
    name="NIS2 (EU) 2024/2690",
    citation="(EU) 2024/2690",
    position=80,
    requirements={
        # backup plan: recovery times, complete copies incl. configuration, another network or location,
        # access control and retention
        "4.2.2": ("BK-01", "BK-02", "TI-01", "MD-01", "IM-01", "RD-01", "EN-01"),
        "4.2.3": ("VR-01",),  # regular integrity checks
        "4.2.6": ("RT-01", "DR-01", "SO-01"),  # recovery tests, results documented, corrective action
    },
)
