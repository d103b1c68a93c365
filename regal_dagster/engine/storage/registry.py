"""Opening a repository: the backend its URL's scheme names, wrapped once in retry and logging.

Backends are the modules under engine/storage/ with a module-level `BACKEND` (base.Backend); a URL
without "scheme://" is a path and goes to the backend serving "file".
"""

from __future__ import annotations

import functools

from ..plugins import plugin_modules
from ..settings import PolicyView, RepositorySettings
from .base import Backend, Repository
from .logged import Logged
from .retry import Retrying


@functools.cache
def backends() -> tuple[Backend, ...]:
    found = [getattr(module, "BACKEND", None) for module in plugin_modules(__package__)]
    return tuple(sorted((b for b in found if isinstance(b, Backend)), key=lambda b: b.kind))


def scheme_of(url: str) -> str:
    scheme, separator, _rest = url.partition("://")
    return scheme.lower() if separator else "file"


def backend_for(url: str) -> Backend:
    """The backend serving `url`; ValueError listing the URLs this regal-backup can open otherwise."""
    scheme = scheme_of(url)
    for backend in backends():
        if scheme in backend.schemes:
            return backend
    raise ValueError(f"no repository backend serves {scheme}:// URLs; use "
                     + ", or ".join(b.example for b in backends()))


def open_repository(policy: PolicyView, config: RepositorySettings | None = None) -> Repository:
    """The policy's repository, or the one `config` describes (the off-site copy)."""
    config = config or policy.repository
    store = backend_for(config.url).open(config, policy.base_dir)
    return Retrying(Logged(store), config.retry)


def open_offsite(policy: PolicyView) -> Repository | None:
    return open_repository(policy, policy.offsite) if policy.offsite else None
