"""Where backups are stored: the object store interface, its backends and how one is opened."""

from .base import ObjectWriter, Repository, StoredObject
from .registry import open_offsite, open_repository

__all__ = ["ObjectWriter", "Repository", "StoredObject", "open_offsite", "open_repository"]
