"""The code location loaded by workspace.yaml: one Definitions object, built from $REGAL_POLICY
(default ./regal_backup.yaml)."""

from .defs import build_definitions

defs = build_definitions()
