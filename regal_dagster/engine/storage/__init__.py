"""Where backups are stored: the object store interface, its backends and how one is opened."""

from .base import (
    Backend,
    ObjectWriter,
    Repository,
    StorageUnavailableError,
    StoredObject,
    TransientStorageError,
)
from .registry import backend_for, backends, open_offsite, open_repository

__all__ = [
    "Backend",
    "ObjectWriter",
    "Repository",
    "StorageUnavailableError",
    "StoredObject",
    "TransientStorageError",
    "backend_for",
    "backends",
    "open_offsite",
    "open_repository",
]
