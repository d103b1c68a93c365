"""ISO/IEC 27001:2022 Annex A: information backup (8.13), ICT readiness for business continuity (5.30),
logging (8.15) and the use of cryptography (8.24). Cited by identifier only."""

from .base import Framework

FRAMEWORK = Framework(
    name="ISO/IEC 27001:2022",
    citation="ISO/IEC 27001:2022",
    position=50,
    requirements={
        "8.13": ("BK-01", "VR-01", "RT-01", "RD-01"),  # backups kept and regularly tested per the backup policy
        "5.30": ("BK-02", "TI-01", "DR-01"),  # ICT readiness: recovery objectives met and rehearsed
        "8.15": ("AU-01", "AU-02", "AU-03"),  # logs produced, protected and kept
        "8.24": ("EN-01", "EN-02", "KM-01"),  # cryptography and key management
    },
)
