"""GDPR: the security of processing (Art. 32), storage limitation and integrity (Art. 5), erasure (Art. 17)
and the records of processing (Art. 30)."""

from .base import Framework

FRAMEWORK = Framework(
    name="GDPR",
    citation="GDPR",
    position=30,
    requirements={
        "Art. 5(1)(e)": ("RD-01",),  # storage limitation
        "Art. 5(1)(f)": ("AU-02",),  # integrity and confidentiality
        "Art. 17": ("GD-01",),  # right to erasure
        "Art. 30": ("AU-01", "GD-01"),  # records of processing activities
        "Art. 32(1)(a)": ("EN-01", "EN-02"),  # encryption of personal data
        "Art. 32(1)(c)": ("BK-02", "MD-01", "RT-01", "DR-01"),  # restore availability in a timely manner
        "Art. 32(1)(d)": ("VR-01", "RT-01"),  # regularly testing the measures' effectiveness
    },
)
