"""DORA, Regulation (EU) 2022/2554, Article 12 (backup policies, restoration and recovery): paragraphs (1) to
(7). Cited by identifier only."""

from .base import Framework

FRAMEWORK = Framework(
    name="DORA (EU) 2022/2554",
    citation="DORA",
    position=70,
    requirements={
        "Art. 12(1)": ("BK-01", "BK-02", "TI-01"),  # backup policy: scope and minimum frequency
        "Art. 12(2)": ("RT-01", "DR-01"),  # restoration and recovery tested periodically
        "Art. 12(3)": ("SG-01",),  # restoration on systems segregated from the source
        "Art. 12(4)": ("MD-01",),  # redundant capacities
        "Art. 12(5)": ("MD-01",),  # a secondary site
        "Art. 12(6)": ("BK-02", "RT-01", "TI-01"),  # recovery time and point objectives, met
        "Art. 12(7)": ("VR-01", "RT-01"),  # multiple checks and reconciliations when recovering
    },
)
