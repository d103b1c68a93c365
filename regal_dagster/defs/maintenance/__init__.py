"""Repository maintenance in Dagster: the daily prune and the quarterly retention proof."""

from .prune import PRUNE_JOB, maintenance_definitions

__all__ = ["PRUNE_JOB", "maintenance_definitions"]
