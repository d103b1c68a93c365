"""SOX IT general controls: computer operations (backup, verification and recovery of financial data)."""

from .base import Framework

FRAMEWORK = Framework(
    name="SOX ITGC",
    citation="SOX ITGC",
    position=20,
    matrix_position=5,  # cited before PCI DSS in a control's mapping
    requirements={
        "CO-1": ("BK-01", "BK-02"),  # backups are scheduled, run, and failures resolved
        "CO-2": ("VR-01",),  # backups are verified
        "CO-3": ("RT-01",),  # restores are tested
    },
)
