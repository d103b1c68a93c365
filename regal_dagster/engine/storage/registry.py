"""Opening a repository: the backend its URL's scheme names."""

from __future__ import annotations

from ..policy import Policy, RepositoryConfig
from .base import Repository


def open_repository(policy: Policy, config: RepositoryConfig | None = None) -> Repository:
    """The policy's repository, or the one `config` describes (the off-site copy)."""
    config = config or policy.repository
    if config.is_s3:
        from .s3 import S3Repository

        return S3Repository(config)
    from .local import LocalRepository

    return LocalRepository(policy.local_repository_path(config), lock_wait=config.lock_wait)


def open_offsite(policy: Policy) -> Repository | None:
    return open_repository(policy, policy.offsite) if policy.offsite else None
