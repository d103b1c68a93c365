"""NIST SP 800-53 rev. 5: contingency planning (CP-9 with enhancements 1, 2, 3, 5 and 8; CP-10 with 2 and
4; CP-4), audit protection and non-repudiation (AU-9, AU-10), keys and cryptography (SC-12, SC-13,
SC-28). The catalogue is public domain and published in OSCAL (usnistgov/oscal-content); the component
definition (engine/compliance/component.py) says how Regal Backup implements each."""

from .base import Framework

FRAMEWORK = Framework(
    name="NIST SP 800-53 rev. 5",
    citation="NIST SP 800-53",
    position=90,
    requirements={
        "CP-9": ("BK-01", "BK-02", "IM-01"),
        "CP-9(1)": ("VR-01", "RT-01"),  # testing for reliability and integrity
        "CP-9(2)": ("RT-01",),  # test restoration using sampling
        "CP-9(3)": ("MD-01",),  # separate storage
        "CP-9(5)": ("MD-01",),  # transfer to alternate storage site
        "CP-9(8)": ("EN-01", "KM-01"),  # cryptographic protection
        "CP-10(2)": ("RT-01",),  # transaction recovery
        "CP-10(4)": ("RT-01", "DR-01"),  # restore within time period
        "CP-4": ("DR-01", "RT-01", "SO-01"),  # contingency plan testing
        "AU-9": ("AU-02", "AU-03"),
        "AU-10": ("AU-01", "AU-02"),
        "SC-12": ("KM-01",),
        "SC-13": ("EN-01", "EN-02"),
        "SC-28": ("EN-01",),
    },
)
