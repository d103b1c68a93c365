"""Regal Backup: backups, verification, restore tests and compliance reports for the Regal POS backend."""

__version__ = "0.1.0"
