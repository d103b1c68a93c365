"""PCI DSS 4.0.1: the requirements on backups, keys, media, logging and incident response that our
controls meet, by 4.0.1's own numbering (reviewed against it: 9.4.1.1 for backups in a secure location beside
9.4.1, 10.3.4 for change detection on audit logs beside 10.3.2)."""

from .base import Framework

FRAMEWORK = Framework(
    name="PCI DSS 4.0.1",
    citation="PCI DSS",
    position=10,
    requirements={
        "3.2.1": ("RD-01",),  # account data kept only as long as the retention policy says
        "3.5.1": ("EN-01",),  # stored account data rendered unreadable (strong cryptography)
        "3.7.4": ("KM-01",),  # keys changed at the end of their cryptoperiod
        "4.2.1": ("EN-02",),  # strong cryptography for data in transit over open networks
        "9.4.1": ("MD-01",),  # media with account data physically secured
        "9.4.1.1": ("MD-01",),  # backups stored in a secure location (ours: off-site, another failure domain)
        "10.2.1": ("AU-01",),  # audit logs enabled and active
        "10.2.2": ("AU-01",),  # audit logs record the details of each event
        "10.3.2": ("AU-02",),  # audit logs protected from modification
        "10.3.4": ("AU-02",),  # change detection on audit logs (ours: the hash chain against its checkpoints)
        "10.5.1": ("AU-03",),  # audit log history kept at least 12 months
        "10.7.2": ("AL-01",),  # failures of critical security control systems detected and alerted
        "12.10.1": ("BK-01",),  # incident response plan: business recovery and continuity, data backup
        "12.10.2": ("DR-01",),  # the plan is reviewed and tested at least once every 12 months
    },
)
